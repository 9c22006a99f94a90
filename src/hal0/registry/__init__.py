"""The model registry: models on disk (`store`), pulls (`pull`), the catalog and loadouts.

The package imports none of them: a module that needs the store (every load reads a manifest) does not pay for
the pull machinery, which only a pull uses.
"""
