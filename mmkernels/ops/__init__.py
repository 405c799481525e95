"""One folder per op. ``OPS`` lists them for the test and benchmark machinery."""
from . import norm_concat

OPS = {"norm_concat": norm_concat}
