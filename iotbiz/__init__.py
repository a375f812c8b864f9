"""IoTBiz: a self-hosted platform and agent that make an ordinary Linux box a managed IoT device."""

__version__ = "0.1.0"
