"""VLM pretraining on Ray Train: LLaVA-layout data, alignment and visual instruction tuning.

- ``vla_ray.pretrain.data``: readers for LLaVA-Pretrain / LLaVA-Instruct json (record checks
  that name the record id), the synthetic LangReach-scene generator (``make_vlm_data``) and the
  tokenisation of conversations (image tokens spliced at ``<image>``, labels on assistant turns).
- ``vla_ray.pretrain.model``: the VLA trunk run as a captioning / chat VLM.
- ``vla_ray.pretrain.trainer``: the ``TorchTrainer`` loop (``pretrain``) and the export of the
  final VLM directory, which ``VLAModule`` loads with ``model_config["vlm_path"]``.
"""
