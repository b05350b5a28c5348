"""Shared plumbing for the op modules: env flags, op registration, validation, jagged helpers.

Nothing here is public API; op modules import what they need from the submodules.
"""
