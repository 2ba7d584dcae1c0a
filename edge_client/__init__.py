"""fedmq edge client: a device that fetches the global model, trains locally and sends compressed client updates over MQTT."""
