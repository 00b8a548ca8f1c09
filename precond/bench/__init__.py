"""``python -m precond.bench``: time ``optimizer.step()`` of our presets against peers on the same shapes.

Peers run in the same process with equal settings (refresh period T, max dim): torch's AdamW (fused on CUDA),
and when installed (extra ``bench``) HeavyBall's ``KLShampoo``/``SOAP`` and pytorch-optimizer's ``SOAP``.
Every timed step sees freshly drawn gradients; results are reported as ratios to the fastest peer.
"""
