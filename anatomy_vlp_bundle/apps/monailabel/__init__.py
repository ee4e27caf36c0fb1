"""MONAI Label app (``monailabel start_server --app anatomy_vlp_bundle/apps/monailabel ...``).

- ``main.py``: the app (:class:`main.AnatomyVLPApp`), the file MONAI Label loads;
- :mod:`.infers`: ``anatomy_vlp_regions`` (anatomy label map) and ``anatomy_vlp_findings``
  (the contract result: findings, abnormality, boxes, report), both running the bundle's ``Predictor``;
- :mod:`.trainers`: ``anatomy_vlp`` training, which hands the bundle whole contract records
  (reports, findings) with the datastore's final labels as anatomy masks;
- :mod:`.uploads`: what clients may send: names without path components, files that are images
  (the checked datastore, the content check of the infer tasks, the upload guard of the server).

Needs ``monailabel`` (``bash scripts/label_env.sh``); importing this package alone does not.
"""
