//! The SQLite schema, as numbered migrations applied in order and recorded in `user_version`.

/// Each entry moves the schema from version `i` to `i + 1`. Append only.
pub const MIGRATIONS: &[&str] = &[
    // 1: commands, outbox, rules mirror, devices, relay states, replay counters, cursors.
    r#"
    create table commands (
        id integer primary key,              -- relay_commands_slave.id in the cloud
        master_device_id text not null,
        slave_mac_address text not null,
        slave_device_id text,
        relay_numbers text not null,         -- JSON arrays, as in the cloud row
        actions text not null,
        duration_seconds text not null,
        command_type text not null,
        triggered_by text not null,
        priority integer not null,
        rule_id text,
        rule_name text,
        expires_at_ms integer not null,
        state text not null check (state in ('accepted', 'sent', 'completed', 'failed', 'expired')),
        attempts integer not null default 0,
        last_sent_at_ms integer,
        signing_counter integer,
        accepted_at_ms integer not null,
        finished_at_ms integer,
        execution_time_ms integer,
        error_message text,
        relay_states text,
        -- Handed to a master polling the local API instead of sent over MQTT.
        polled_by text
    );
    create index commands_open on commands (state, master_device_id) where state in ('accepted', 'sent');

    create table outbox (
        seq integer primary key autoincrement,
        class text not null check (class in ('completion', 'telemetry', 'event', 'rule_command', 'device_status', 'relay_state', 'rule_feedback')),
        idempotency_key text not null unique,
        payload text not null,
        created_at_ms integer not null,
        attempts integer not null default 0,
        next_attempt_at_ms integer not null default 0,
        last_error text
    );
    create index outbox_class on outbox (class, seq);

    -- Rows the cloud refused for good (a 4xx other than auth): kept, counted, never retried blindly.
    create table outbox_rejected (
        seq integer primary key,
        class text not null,
        idempotency_key text not null,
        payload text not null,
        created_at_ms integer not null,
        rejected_at_ms integer not null,
        reason text not null
    );

    create table rules (
        id text primary key,                 -- decision_rules.id (uuid)
        device_id text not null,
        rule_id text not null,
        rule_name text,
        rule_description text,
        rule_json text,
        enabled integer not null,
        priority integer not null,
        cooldown_seconds integer not null,
        max_executions_per_hour integer not null,
        revision integer not null,
        deleted integer not null,
        changed_at text not null
    );
    create index rules_device on rules (device_id, priority desc);

    create table devices (
        device_id text primary key,
        online integer not null default 0,
        last_seen_ms integer,
        firmware_version text,
        wifi_rssi integer,
        announced_at_ms integer,
        delivered_config_version integer
    );

    create table relay_states (
        master_device_id text not null,
        slave_mac_address text not null,
        states text not null,
        updated_at_ms integer not null,
        primary key (master_device_id, slave_mac_address)
    );

    -- The last signing counter used per master: a replayed command must never verify.
    create table signing_counters (
        master_device_id text primary key,
        counter integer not null
    );

    create table cursors (
        name text primary key,
        value text not null
    );

    create table counters (
        name text primary key,
        value integer not null
    );
    "#,
    // 2: the decision engine's state (rule timers, the interlock arbiter), a short reading
    // history for `rules test`, macros, and the cloud row id of commands the Pi created.
    r#"
    create table rule_states (
        rule text primary key,               -- decision_rules.id
        state text not null,                 -- JSON: cooldown, hourly firings, held-for starts, arming
        updated_at_ms integer not null
    );

    -- One row: relays on with their off-deadline, off-since times, holds, the emergency latch.
    create table safety_state (
        id integer primary key check (id = 1),
        snapshot text not null,
        updated_at_ms integer not null
    );

    create table readings_history (
        device_id text not null,
        sensor_key text not null,
        recorded_at_ms integer not null,
        value real not null,
        primary key (device_id, sensor_key, recorded_at_ms)
    ) without rowid;
    create index readings_history_time on readings_history (recorded_at_ms);

    create table macros (
        id text primary key,                 -- macros.id in the cloud
        definition text not null,            -- the row with its macro_actions, as the cloud sent it
        revision integer not null
    );

    -- What was last reported about each rule the engine cannot run, so it is reported once.
    create table rule_problems (
        rule text primary key,
        revision integer not null,
        reason text
    );

    -- Commands a local rule, macro or control created get negative ids here, and this key as
    -- relay_commands_slave.client_id when the cloud learns of them.
    alter table commands add column client_id text;
    "#,
    // 3: each master's anti-replay window for the acks and relay reports it signs, so a report
    // replayed after a restart is still refused.
    r#"
    create table report_windows (
        master_device_id text primary key,
        highest integer not null,            -- u64 counter, stored by its bits
        seen integer not null                -- bitmap of the 64 counters below it, by its bits
    );
    "#,
    // 4: when each reading of the history arrived, so a replay judges staleness as live did.
    r#"
    alter table readings_history add column received_at_ms integer;
    "#,
    // 5: notifications from the Pi (docs/decisions/0012). Triggers copy what may need a
    // notification into `notify_inbox` inside the transaction that records it, so no cause is
    // lost between its commit and the notifier; `notifications` holds one delivery per target.
    r#"
    create table notify_inbox (
        seq integer primary key autoincrement,
        event_type text not null,
        severity text not null,
        message text not null,
        payload text not null,               -- JSON
        occurred_at_ms integer not null
    );

    create table notifications (
        seq integer primary key autoincrement,
        target text not null,                -- "telegram" or "webhook:<name>"
        kind text not null,
        delivery_id text not null,
        text text not null,
        body text not null,                  -- JSON, signed as stored
        created_at_ms integer not null,
        attempts integer not null default 0,
        next_attempt_at_ms integer not null default 0,
        last_error text,
        unique (target, delivery_id)
    );

    create trigger notify_on_event after insert on outbox when new.class = 'event'
    begin
        insert into notify_inbox (event_type, severity, message, payload, occurred_at_ms)
        values (coalesce(json_extract(new.payload, '$.event_type'), ''),
                coalesce(json_extract(new.payload, '$.severity'), 'info'),
                coalesce(json_extract(new.payload, '$.message'), ''),
                coalesce(json_extract(new.payload, '$.payload'), '{}'),
                new.created_at_ms);
    end;

    create trigger notify_on_presence after update of online on devices
    when old.online <> new.online
    begin
        insert into notify_inbox (event_type, severity, message, payload, occurred_at_ms)
        values (case when new.online then 'master_online' else 'master_offline' end,
                case when new.online then 'info' else 'warning' end,
                'master ' || new.device_id || case when new.online then ' is online' else ' is offline' end,
                json_object('device_id', new.device_id),
                coalesce(new.last_seen_ms, 0));
    end;

    create trigger notify_on_rule_error_insert after insert on rule_problems
    when new.reason is not null
    begin
        insert into notify_inbox (event_type, severity, message, payload, occurred_at_ms)
        values ('rule_error', 'warning', 'rule ' || new.rule || ' cannot run: ' || new.reason,
                json_object('rule', new.rule, 'revision', new.revision, 'error', new.reason),
                cast(unixepoch('subsec') * 1000 as integer));
    end;

    create trigger notify_on_rule_error_update after update on rule_problems
    when new.reason is not null and new.reason is not old.reason
    begin
        insert into notify_inbox (event_type, severity, message, payload, occurred_at_ms)
        values ('rule_error', 'warning', 'rule ' || new.rule || ' cannot run: ' || new.reason,
                json_object('rule', new.rule, 'revision', new.revision, 'error', new.reason),
                cast(unixepoch('subsec') * 1000 as integer));
    end;

    create trigger notify_on_refusal after update of state on commands
    when new.state = 'failed' and old.state <> 'failed'
         and new.error_message like '%refused by the Pi''s interlocks%'
    begin
        insert into notify_inbox (event_type, severity, message, payload, occurred_at_ms)
        values ('command_refused', 'warning',
                'command ' || new.id || ' for ' || new.master_device_id || ': ' || new.error_message,
                json_object('command_id', new.id, 'master_device_id', new.master_device_id,
                            'reason', new.error_message),
                coalesce(new.finished_at_ms, 0));
    end;
    "#,
    // 6: bounded history (docs/decisions/0014). One-minute rollups per device and sensor, kept
    // longer than raw readings, built from what the raw table holds now; the raw table's row
    // count and the rollups' kept in `counters` (a count(*) over millions of rows on every
    // housekeeping step would cost more than the prune). The switch to incremental auto-vacuum
    // needs a VACUUM, which cannot run in this transaction: `Store::ensure_incremental_vacuum`.
    r#"
    create table readings_rollup (
        device_id text not null,
        sensor_key text not null,
        minute_ms integer not null,          -- the minute's start, Unix ms
        min real not null,
        max real not null,
        sum real not null,
        count integer not null,
        last real not null,                  -- the value of the minute's latest reading
        last_at_ms integer not null,         -- its recorded_at_ms
        last_received_at_ms integer,         -- when it arrived (replay judges staleness by it)
        primary key (device_id, sensor_key, minute_ms)
    ) without rowid;
    create index readings_rollup_time on readings_rollup (minute_ms);

    insert into readings_rollup (device_id, sensor_key, minute_ms, min, max, sum, count, last,
                                 last_at_ms, last_received_at_ms)
    select m.device_id, m.sensor_key, m.minute_ms, m.lo, m.hi, m.total, m.n, h.value, m.last_at,
           h.received_at_ms
    from (select device_id, sensor_key, recorded_at_ms - (recorded_at_ms % 60000) as minute_ms,
                 min(value) as lo, max(value) as hi, sum(value) as total, count(*) as n,
                 max(recorded_at_ms) as last_at
          from readings_history group by 1, 2, 3) as m
    join readings_history as h
      on h.device_id = m.device_id and h.sensor_key = m.sensor_key and h.recorded_at_ms = m.last_at;

    insert into counters (name, value) values
        ('history_raw_rows', (select count(*) from readings_history)),
        ('history_rollup_rows', (select count(*) from readings_rollup))
    on conflict (name) do update set value = excluded.value;
    "#,
    // 7: rows the backend may have received although their push failed (no answer, a gateway's
    // 504): retried like any other, but never dropped as lost while certainly lost rows remain.
    r#"
    alter table outbox add column in_doubt integer not null default 0;
    "#,
    // 8: the arbiter's relays a row each, so a decision writes the relays it changed and not
    // every relay the Pi has seen (decision 23); `safety_state` keeps the latch.
    r#"
    create table safety_relays (
        relay text primary key,              -- master|SLAVE_MAC|relay
        entry text not null                  -- JSON: {"relay": …, "state": …}
    ) without rowid;
    insert or replace into safety_relays (relay, entry)
    select json_extract(r.value, '$.relay.master') || '|' || upper(json_extract(r.value, '$.relay.slave_mac'))
               || '|' || json_extract(r.value, '$.relay.relay'),
           r.value
    from safety_state as s, json_each(s.snapshot, '$.relays') as r
    where json_valid(s.snapshot);
    update safety_state set snapshot = json_remove(snapshot, '$.relays') where json_valid(snapshot);
    "#,
];
