-- The decision engine runs on the Pi; the cloud learns afterwards what it did.
--
-- rule_executions: one row per rule firing (or refused firing), written by the agent that ran it,
-- idempotent by client_id, explaining itself for the dashboard.
-- report_rule_errors: the agent writes back why it cannot run a rule (decision_rules.last_error)
-- without bumping the rule's revision (a bump would make every mirror reload the rule, fail
-- again and report again, for ever).

create table public.rule_executions (
  id bigint generated always as identity primary key,
  client_id uuid not null constraint rule_executions_client_id_unique unique,
  agent_id text not null references public.edge_agents (agent_id) on delete cascade,
  device_id text not null references public.device_status (device_id) on delete cascade,
  -- decision_rules.id; no foreign key: the history outlives a deleted rule.
  rule_uuid uuid not null,
  rule_id text not null,
  rule_name text,
  priority integer not null constraint rule_executions_priority_range check (priority between 0 and 100),
  executed_at timestamptz not null,
  result text not null
    constraint rule_executions_result_known check (result in ('executed', 'refused', 'failed')),
  -- "ph 6.31 < 6.5 held 32 s; 3/10 this hour; interlocks ok; relay 0 on 60 s"
  explanation text not null constraint rule_executions_explanation_length check (length(explanation) <= 4000),
  -- The readings that made the rule true: [{"sensor": "ph", "value": 6.31, "recorded_at": ...}].
  readings jsonb not null default '[]'::jsonb,
  actions jsonb not null default '[]'::jsonb,
  hourly_count integer not null default 0,
  hourly_max integer not null default 0,
  cooldown_seconds integer not null default 0,
  -- relay_commands_slave.client_id of the commands this firing created.
  command_client_ids uuid[] not null default '{}',
  created_at timestamptz not null default now()
);
create index rule_executions_device_time_idx on public.rule_executions (device_id, executed_at desc);
create index rule_executions_rule_time_idx on public.rule_executions (rule_uuid, executed_at desc);

alter table public.rule_executions enable row level security;
-- Supabase's default privileges give anon every new table; it gets nothing here.
revoke all on public.rule_executions from anon;
grant select, insert on public.rule_executions to authenticated;
grant all on public.rule_executions to service_role;

create policy rule_executions_select on public.rule_executions for select to authenticated
  using (private.can_access_device(device_id));
-- Only the agent that serves the device records what its engine did, under its own name.
create policy rule_executions_insert on public.rule_executions for insert to authenticated
  with check (
    private.caller_kind() = 'agent'
    and agent_id = auth.jwt() ->> 'agent_id'
    and private.can_access_device(device_id)
  );

-- A change of last_error alone is the engine's feedback, not an edit of the rule.
create or replace function private.bump_rule_revision() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if (to_jsonb(new) - 'last_error' - 'updated_at') = (to_jsonb(old) - 'last_error' - 'updated_at') then
    new.revision := old.revision;
    new.updated_at := old.updated_at;
    return new;
  end if;
  new.revision := old.revision + 1;
  new.updated_at := now();
  new.created_at := old.created_at;
  return new;
end
$$;

-- p_errors: [{"id": uuid, "revision": bigint, "error": text | null}, ...] (at most 500). An error
-- for an older revision than the rule has now is ignored: the rule was edited since. Returns how
-- many rules changed.
create or replace function public.report_rule_errors(p_errors jsonb)
returns integer
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_changed integer;
begin
  if private.caller_kind() is distinct from 'agent' then
    return 0;
  end if;
  if jsonb_typeof(p_errors) is distinct from 'array' or jsonb_array_length(p_errors) > 500 then
    raise exception 'p_errors must be an array of at most 500 {id, revision, error}'
      using errcode = 'invalid_parameter_value';
  end if;
  update public.decision_rules r
     set last_error = left(e.error, 1000)
    from jsonb_to_recordset(p_errors) as e(id uuid, revision bigint, error text)
   where r.id = e.id
     and r.revision = e.revision
     and r.last_error is distinct from left(e.error, 1000)
     and private.can_access_device(r.device_id);
  get diagnostics v_changed = row_count;
  return v_changed;
end
$$;

revoke all on function public.report_rule_errors(jsonb) from public, anon;
grant execute on function public.report_rule_errors(jsonb) to authenticated, service_role;

-- Agents read the macros they run together with their steps (PostgREST embedding).
comment on table public.macro_actions is
  'Ordered steps of a macro: relay {master_device_id, slave_mac_address, relay_number, action, duration_seconds}, delay (delay_ms), mqtt_publish {topic, payload, retain}, macro (action_target = nested macro id).';
