"""Dose prediction: from CT, OARs and PTVs (with their prescriptions) to dose in Gy.

- :mod:`models.dose.features`: the input channels and the model grid (numpy only), shared by
  training and inference so that both see the same preprocessing.
- :mod:`models.dose.data`: OpenKBP cases on the model grid, cached.
- :mod:`models.dose.network`, :mod:`models.dose.train`, :mod:`models.dose.export`: torch
  (extra ``train``).
- :mod:`models.dose.metrics`, :mod:`models.dose.evaluate`: the OpenKBP challenge scores.
- :mod:`models.dose.predict`: :class:`DosePredictor` (onnxruntime, no torch).

Data: OpenKBP (Babier et al., Medical Physics 48:5549-5561, 2021).
"""
