"""Codes used in per-sample label tensors (one definition for every module).

``findings`` (M, F) and ``study_findings`` (S,) hold, per (anatomy, finding):
PRESENT, ABSENT, UNCERTAIN (left out of metrics; losses ignore by default) or UNKNOWN
(never stated: left out of losses and metrics; also used for padding past an anatomy's
own findings). ``anatomy_presence`` (M,) holds PRESENT, ABSENT or UNKNOWN.
"""

PRESENT = 1
ABSENT = 0
UNCERTAIN = -1
UNKNOWN = -2

__all__ = ["PRESENT", "ABSENT", "UNCERTAIN", "UNKNOWN"]
