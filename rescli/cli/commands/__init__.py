"""One module per pipeline step, holding its commands: each parses, calls the library, renders, exits.

data (dataset), train (finetune, lr-find), evaluation (evaluate, report), inference (predict, export, info),
experiments (degradation). rescli.cli.app registers them. A command imports its library function when it
runs, not at import: `rescli --help` and predict's thread settings must come before torch loads.
"""
