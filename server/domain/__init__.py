"""The pure middle: parsing reports, versions, releases, operator policy, advisories, JSON.

No module here does network or database I/O; each is tested without an event loop. The only
files read are the bundled catalog and advisories, through ``importlib.resources``.
"""
