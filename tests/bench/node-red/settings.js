// Node-RED settings for bench-engine's peer (tests/src/bin/bench-engine.rs): no editor, no admin
// API, no HTTP nodes; the flow (flow.json) talks only to the benchmark's broker on loopback.
module.exports = {
    flowFile: "flow.json",
    // The broker login is written by the benchmark into flow_cred.json beside the flow, per run.
    credentialSecret: false,
    // With neither the admin API nor HTTP nodes, Node-RED opens no listener at all.
    uiHost: "127.0.0.1",
    httpAdminRoot: false,
    httpNodeRoot: false,
    disableEditor: true,
    // The rule signs its command as the agent does (HMAC-SHA256 under the master's key).
    functionGlobalContext: { crypto: require("crypto") },
    logging: { console: { level: "warn", metrics: false, audit: false } },
    editorTheme: { projects: { enabled: false } },
    telemetry: { enabled: false },
};
