"""pylium plugin `kafka`: Kafka L7 policy proxy (role, apiKey, topic, clientID)."""
