"""The science of the Spine Response Node, kept pure.

Arrays, SimpleITK images and plain metadata in; arrays, numbers and result objects out. No sockets,
no database, no files other than those handed in. ``processing`` imports neither ``node`` nor
``reporting``.
"""
