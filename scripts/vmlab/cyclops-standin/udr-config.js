// == Configuration (Grafana datasources of the UDR dashboard, as in cyclops-udr's
// install/openstack/config/config.js)
define(['settings'],
    function (Settings) {
        return new Settings({
            datasources: {
                influxdb: {
                    type: 'influxdb',
                    url: "http://127.0.0.1:8086/db/udr_service",
                },
                grafana: {
                    type: 'influxdb',
                    url: "http://127.0.0.1:8086/db/grafana",
                    grafanaDB: true
                },
            },
            search: {
                max_results: 20
            },
        });
    });
