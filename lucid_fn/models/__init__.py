"""Model families. Importing this package registers every builder."""

from lucid_fn.models import pvt, pvt_v2  # noqa: F401  (register pvt_*, pvt_v2_*)
from lucid_fn.models import semantic_fpn  # noqa: F401  (after its backbones)
