"""
taskmesh: distribute tasks from a master to slave daemons over a STOMP broker.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
