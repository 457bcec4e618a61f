"""What every layer of tunefleet shares: errors, atomic JSON files, the run status, typed settings, the Ray connection.

Imports flow one way: `tunefleet.launcher` -> `tunefleet.trainers` and `tunefleet.eval` -> `tunefleet.common`.
Nothing here imports another tunefleet package.
"""
