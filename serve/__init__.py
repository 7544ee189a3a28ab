"""Ray Serve application for the exported policy (imported as ``vla_ray.serve``)."""
