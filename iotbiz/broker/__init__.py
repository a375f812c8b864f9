"""The embedded MQTT broker: amqtt with IoTBiz's authentication, ACL and presence plugins."""
