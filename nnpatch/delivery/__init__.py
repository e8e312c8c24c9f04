"""Delivery: how a device follows a release feed (spec/MANIFEST.md, SECURITY.md "Release feeds").

- ``manifest``: the manifest's format, its times and release numbers; validating and encoding one.
- ``trust``: the signed envelope (DSSE), expiry, and the release number against the device's state.
- ``state``: the state file beside the model: what the device last accepted.
- ``fetch``: local paths, and HTTP(S) through urllib3 with Range resume.
- ``updater``: ``update``, which brings a model to a release's target.

The publisher's side, ``make_release``, is :mod:`nnpatch.release`. This package's ``__init__``
imports nothing, so that reading a manifest does not load the applier.
"""
