"""Exporters: where snapshots go (``PrometheusExporter`` in the core, ``InfluxDBExporter`` as
the ``influxdb`` extra)."""
