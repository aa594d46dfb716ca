"""moeperf's performance model: specs, op graph, simulator, search, report, calibration.

Never imports torch at module level: the simulator must start fast and run without it.
"""

__version__ = "0.1.0"
