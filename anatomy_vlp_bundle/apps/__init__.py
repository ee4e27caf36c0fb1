"""Applications built on the bundle's inference API (:mod:`anatomy_vlp_bundle.inference`); each needs
its own environment (see ``docs/README.md``) and is not imported by the bundle itself."""
