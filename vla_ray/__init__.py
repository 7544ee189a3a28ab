"""vla-ray: distributed, RL-first training of Vision-Language-Action policies on Ray.

Main entry points: ``vla_ray.models.vla.VLA`` (the policy, usable without RLlib),
``vla_ray.rl_module.VLAModule`` (the same policy as an RLlib RLModule), ``vla_ray.envs``
(gymnasium envs), ``vla_ray.train`` (presets -> RLlib runs), ``vla_ray.export`` (ONNX, TorchScript,
OpenVINO, Triton), ``vla_ray.serve`` (the Ray Serve endpoint) and the ``vla-ray`` CLI.
"""

__version__ = "0.1.0"
