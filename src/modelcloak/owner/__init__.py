"""The owner backend: models, devices, licences, key release, usage metering (`modelcloak serve`)."""
