"""The offline testbed: a procedural world of objects on stylized backgrounds, a small
SD-inpainting-shaped model trained on it (shipped in ``weights/``, loaded with
``model.pretrained=testbed``), and two judges (fidelity, harmony) to score inpaintings.

Modules: ``world`` (scenes), ``vocab`` / ``tokenizer`` (captions and their CLIP tokenizer),
``models`` (configs, building, loading), ``data`` (training batches), ``train``, ``judges``,
``metrics`` (the judges as attnctl metrics), ``samples`` (scenes written to disk) and
``evaluate`` (Table III on the world).
"""
