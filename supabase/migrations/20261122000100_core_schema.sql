-- AutoCore Edge, contract 1: the tables the dashboard, the Pi agents and ESP32 masters share.
-- Names follow the seed documents exactly; clients that already exist depend on them.
-- Append-only: never edit a migration that has been applied; add a new one.

create schema if not exists private;
revoke all on schema private from public;

-- ---------------------------------------------------------------------------
-- Edge agents (one per Raspberry Pi) and the devices they serve
-- ---------------------------------------------------------------------------

create table public.edge_agents (
  agent_id text primary key
    constraint edge_agents_agent_id_format check (agent_id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
  owner_id uuid not null references auth.users (id) on delete cascade,
  name text,
  created_at timestamptz not null default now(),
  -- A revoked agent's token no longer reaches anything, even before it expires.
  revoked_at timestamptz
);
comment on table public.edge_agents is 'Raspberry Pi edge agents; an agent JWT carries agent_id and sub = owner_id.';

create table public.device_status (
  device_id text primary key
    constraint device_status_device_id_format check (device_id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
  owner_id uuid not null references auth.users (id) on delete cascade,
  agent_id text references public.edge_agents (agent_id) on delete set null,
  user_email text,
  device_name text,
  device_type text not null default 'master'
    constraint device_status_device_type_known check (device_type in ('master', 'slave', 'sensor', 'display', 'gateway')),
  mac_address text
    constraint device_status_mac_address_format check (mac_address ~ '^[0-9A-F]{2}(:[0-9A-F]{2}){5}$'),
  is_online boolean not null default false,
  last_seen timestamptz,
  firmware_version text,
  wifi_rssi integer
    constraint device_status_wifi_rssi_range check (wifi_rssi between -127 and 0),
  ip_address text,
  -- Device configuration authored in the dashboard; the agent delivers it to the master as a
  -- retained MQTT message whenever config_version moves.
  config jsonb not null default '{}'::jsonb
    constraint device_status_config_is_object check (jsonb_typeof(config) = 'object'),
  config_version integer not null default 1,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
create index device_status_owner_idx on public.device_status (owner_id);
create index device_status_agent_idx on public.device_status (agent_id);

create table public.relay_slaves (
  id bigint generated always as identity primary key,
  master_device_id text not null references public.device_status (device_id) on delete cascade,
  slave_mac_address text not null
    constraint relay_slaves_mac_format check (slave_mac_address ~ '^[0-9A-F]{2}(:[0-9A-F]{2}){5}$'),
  slave_device_id text,
  slave_name text,
  relay_count integer not null default 8
    constraint relay_slaves_relay_count_range check (relay_count between 1 and 16),
  relay_states boolean[] not null default '{}'
    constraint relay_slaves_relay_states_fit check (cardinality(relay_states) <= relay_count),
  is_online boolean not null default false,
  last_seen timestamptz,
  updated_at timestamptz not null default now(),
  constraint relay_slaves_one_row_per_slave unique (master_device_id, slave_mac_address)
);

-- ---------------------------------------------------------------------------
-- Relay commands
-- ---------------------------------------------------------------------------

create table public.relay_commands_slave (
  id bigint generated always as identity primary key,
  -- Idempotency key: an agent that retries an insert sends the same client_id, and the second
  -- insert is ignored instead of creating a second command.
  client_id uuid not null default gen_random_uuid()
    constraint relay_commands_slave_client_id_unique unique,
  master_device_id text not null references public.device_status (device_id) on delete cascade,
  user_email text,
  master_mac_address text,
  slave_device_id text,
  slave_mac_address text not null
    constraint relay_commands_slave_mac_format check (slave_mac_address ~ '^[0-9A-F]{2}(:[0-9A-F]{2}){5}$'),
  relay_numbers integer[] not null,
  actions text[] not null,
  duration_seconds integer[] not null,
  command_type text not null default 'manual'
    constraint relay_commands_slave_command_type_known
      check (command_type in ('manual', 'rule', 'peristaltic', 'automation')),
  triggered_by text not null default 'manual'
    constraint relay_commands_slave_triggered_by_known
      check (triggered_by in ('manual', 'rule', 'automation', 'peristaltic', 'macro')),
  priority integer not null default 10
    constraint relay_commands_slave_priority_range check (priority between 0 and 100),
  rule_id text,
  rule_name text,
  status text not null default 'pending'
    constraint relay_commands_slave_status_known
      check (status in ('pending', 'processing', 'sent', 'completed', 'failed', 'expired', 'cancelled')),
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  -- A command that could not run by expires_at is never run late.
  expires_at timestamptz not null default now() + interval '5 minutes',
  locked_at timestamptz,
  locked_by text,
  delivery_count integer not null default 0,
  sent_at timestamptz,
  completed_at timestamptz,
  execution_time_ms integer
    constraint relay_commands_slave_execution_time_range check (execution_time_ms between 0 and 86400000),
  error_message text
    constraint relay_commands_slave_error_message_length check (length(error_message) <= 1000),
  -- peristaltic > rule > automation > manual, as the seeds order them.
  type_rank smallint generated always as (
    case command_type when 'peristaltic' then 0 when 'rule' then 1 when 'automation' then 2 else 3 end
  ) stored,

  constraint relay_commands_slave_arrays_same_length check (
    cardinality(relay_numbers) = cardinality(actions)
    and cardinality(relay_numbers) = cardinality(duration_seconds)
  ),
  constraint relay_commands_slave_at_least_one_relay check (cardinality(relay_numbers) >= 1),
  constraint relay_commands_slave_max_16_relays check (cardinality(relay_numbers) <= 16),
  constraint relay_commands_slave_manual_max_5_relays check (
    command_type <> 'manual' or cardinality(relay_numbers) <= 5
  ),
  constraint relay_commands_slave_relay_number_range check (
    array_position(relay_numbers, null) is null
    and 0 <= all (relay_numbers) and 15 >= all (relay_numbers)
  ),
  constraint relay_commands_slave_actions_on_off check (
    array_position(actions, null) is null and actions <@ array['on', 'off']
  ),
  constraint relay_commands_slave_duration_range check (
    array_position(duration_seconds, null) is null
    and 0 <= all (duration_seconds) and 86400 >= all (duration_seconds)
  ),
  constraint relay_commands_slave_rule_names_rule check (
    command_type <> 'rule' or rule_id is not null
  ),
  constraint relay_commands_slave_expiry_window check (
    expires_at > created_at and expires_at <= created_at + interval '7 days'
  )
);
comment on column public.relay_commands_slave.client_id is
  'Client-generated idempotency key; insert with on_conflict=client_id and resolution=ignore-duplicates.';
comment on column public.relay_commands_slave.delivery_count is
  'How many times get_and_lock_slave_commands handed this command out; above 1 after a lock timeout.';

-- The dequeue path: one master, open commands, in hand-out order.
create index relay_commands_slave_queue_idx on public.relay_commands_slave
  (master_device_id, type_rank, priority desc, created_at, id)
  where status in ('pending', 'processing');
create index relay_commands_slave_master_created_idx on public.relay_commands_slave
  (master_device_id, created_at desc);

-- ---------------------------------------------------------------------------
-- Decision rules, mirrored incrementally by agents
-- ---------------------------------------------------------------------------

create table public.decision_rules (
  id uuid primary key default gen_random_uuid(),
  device_id text not null references public.device_status (device_id) on delete cascade,
  rule_id text not null
    constraint decision_rules_rule_id_format check (rule_id ~ '^[A-Za-z0-9_.:-]{1,64}$'),
  rule_name text not null
    constraint decision_rules_rule_name_length check (length(rule_name) between 1 and 200),
  rule_description text,
  rule_json jsonb not null
    -- coalesce: a missing key makes the expression NULL, and a NULL check passes.
    constraint decision_rules_rule_json_shape check (coalesce(
      jsonb_typeof(rule_json) = 'object'
      and rule_json ? 'conditions'
      and jsonb_typeof(rule_json -> 'actions') = 'array'
      and jsonb_array_length(rule_json -> 'actions') between 1 and 32,
      false)),
  enabled boolean not null default true,
  priority integer not null default 50
    constraint decision_rules_priority_range check (priority between 0 and 100),
  cooldown_seconds integer not null default 60
    constraint decision_rules_cooldown_range check (cooldown_seconds between 0 and 86400),
  max_executions_per_hour integer not null default 10
    constraint decision_rules_max_executions_range check (max_executions_per_hour between 1 and 3600),
  created_by text not null default 'web_interface',
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  -- Bumped on every change, so a mirror that sees the same rule twice keeps the newer one.
  revision bigint not null default 1,
  -- The engine's complaint about this rule, written back by the agent for the dashboard.
  last_error text,
  constraint decision_rules_rule_id_unique_per_device unique (device_id, rule_id)
);
create index decision_rules_active_idx on public.decision_rules (device_id, priority desc, created_at)
  where enabled;
create index decision_rules_changes_idx on public.decision_rules (device_id, updated_at, id);

-- A deleted rule leaves a tombstone so that a mirror learns of the deletion.
create table public.decision_rule_tombstones (
  id uuid primary key,
  device_id text not null,
  rule_id text not null,
  revision bigint not null,
  deleted_at timestamptz not null default now()
);
create index decision_rule_tombstones_changes_idx on public.decision_rule_tombstones (device_id, deleted_at, id);

-- ---------------------------------------------------------------------------
-- Telemetry, events, emergency stop, macros
-- ---------------------------------------------------------------------------

create table public.telemetry_data (
  id bigint generated always as identity primary key,
  device_id text not null references public.device_status (device_id) on delete cascade,
  sensor_key text not null
    constraint telemetry_data_sensor_key_format check (sensor_key ~ '^[A-Za-z0-9_.-]{1,64}$'),
  value double precision not null,
  unit text
    constraint telemetry_data_unit_length check (length(unit) <= 16),
  recorded_at timestamptz not null,
  received_at timestamptz not null default now(),
  -- The natural key makes a re-pushed batch a no-op (resolution=ignore-duplicates).
  constraint telemetry_data_one_reading unique (device_id, sensor_key, recorded_at)
);
create index telemetry_data_device_time_idx on public.telemetry_data (device_id, recorded_at desc);

create table public.event_logs (
  id bigint generated always as identity primary key,
  client_id uuid not null default gen_random_uuid()
    constraint event_logs_client_id_unique unique,
  owner_id uuid references auth.users (id) on delete cascade,
  device_id text references public.device_status (device_id) on delete cascade,
  agent_id text references public.edge_agents (agent_id) on delete cascade,
  event_type text not null
    constraint event_logs_event_type_length check (length(event_type) between 1 and 64),
  severity text not null default 'info'
    constraint event_logs_severity_known check (severity in ('debug', 'info', 'warning', 'error', 'critical')),
  source text not null default 'cloud',
  action text,
  message text
    constraint event_logs_message_length check (length(message) <= 4000),
  payload jsonb not null default '{}'::jsonb,
  occurred_at timestamptz not null default now(),
  created_at timestamptz not null default now(),
  constraint event_logs_has_scope check (owner_id is not null or device_id is not null or agent_id is not null)
);
create index event_logs_device_time_idx on public.event_logs (device_id, occurred_at desc);
create index event_logs_owner_time_idx on public.event_logs (owner_id, occurred_at desc);

-- One emergency-stop latch per owner (the owner's whole plant). A software stop is in addition
-- to a hardwired category-0 stop, never instead of it.
create table public.system_status (
  owner_id uuid primary key references auth.users (id) on delete cascade,
  emergency_stop boolean not null default false,
  emergency_reason text,
  emergency_changed_at timestamptz,
  emergency_changed_by text,
  updated_at timestamptz not null default now()
);

create table public.macros (
  id uuid primary key default gen_random_uuid(),
  owner_id uuid not null references auth.users (id) on delete cascade,
  agent_id text references public.edge_agents (agent_id) on delete cascade,
  name text not null constraint macros_name_length check (length(name) between 1 and 200),
  description text,
  enabled boolean not null default true,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  revision bigint not null default 1
);

create table public.macro_actions (
  id uuid primary key default gen_random_uuid(),
  macro_id uuid not null references public.macros (id) on delete cascade,
  sequence integer not null constraint macro_actions_sequence_range check (sequence between 0 and 1000),
  action_type text not null
    constraint macro_actions_action_type_known
      check (action_type in ('relay', 'delay', 'mqtt_publish', 'macro')),
  action_target text,
  action_payload jsonb not null default '{}'::jsonb,
  delay_ms integer not null default 0
    constraint macro_actions_delay_range check (delay_ms between 0 and 3600000),
  condition_check jsonb,
  constraint macro_actions_one_per_step unique (macro_id, sequence)
);
