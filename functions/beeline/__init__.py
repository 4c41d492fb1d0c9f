"""Beeline Cloud PBX: the portal API client (and, later, the XSI event parser)."""
