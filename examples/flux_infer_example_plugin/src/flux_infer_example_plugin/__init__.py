"""An example third-party flux_infer plugin package."""
