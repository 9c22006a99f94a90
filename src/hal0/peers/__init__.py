"""Other hal0 nodes: their slots followed live (`follow`, `view`), and the requests this node forwards to them
(`forward`).

The package imports none of them: an API with no peers configured never imports the following machinery.
"""
