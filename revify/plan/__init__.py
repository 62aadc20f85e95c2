"""Step 3 and 5 of the pipeline: the plan (what becomes reversible, at which widths, what is
checkpointed and nested), the resize rules that rebuild layers at new widths, the schedule that
spends a memory budget, and the report that prints the plan."""
from revify.plan import resize_timm  # noqa: F401  (registers the resize rules of timm's layers)
