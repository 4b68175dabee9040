"""Model families. Importing this package registers every builder."""

from lucid_fn.models import pvt  # noqa: F401  (registers pvt_*)
