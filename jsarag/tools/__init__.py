"""Data tools of the ``jsarag data`` commands."""
