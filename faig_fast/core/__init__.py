"""The attribution core: engine, filters, batches, quadrature, per-filter scores, results and the
reference loop.  Everything else in faig_fast is built on these modules."""
