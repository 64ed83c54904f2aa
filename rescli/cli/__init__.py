from rescli.cli.app import app, main

__all__ = ["app", "main"]
