-- The cloud side for dashboard builders (issue 16, parts 1 and 2):
--   1. decision_rules refuses a rule_json the agent's compiler would refuse for reasons that need
--      no runtime knowledge, naming every problem with its JSON path
--      (docs/decisions/0011-rules-validated-in-the-database.md);
--   2. the tables a dashboard watches are in the supabase_realtime publication with
--      REPLICA IDENTITY FULL, so Supabase Realtime streams their changes (old and new rows).
-- Runs unchanged on hosted Supabase; every statement can run twice.

-- ---------------------------------------------------------------------------
-- 1. rule_json validation
-- ---------------------------------------------------------------------------
-- The rules are agent/src/rules/compile.rs's (and schemas/rule_json.schema.json's) minus what
-- needs the agent: whether a macro exists, how many relays a slave really has (the database caps
-- relay_number at relay_commands_slave's 0..15), and whether croner parses a cron expression.
-- schemas/rule_cases.json holds the cases both validators must agree on
-- (tests/tests/it/cloud_side.rs runs them through both).

-- How a JSON value is named in a message ("a string", "null"; "nothing" when absent).
create or replace function private.rule_json_kind(v jsonb) returns text
language sql immutable
set search_path = ''
as $$
  select case jsonb_typeof(v)
    when 'null' then 'null' when 'boolean' then 'a boolean' when 'number' then 'a number'
    when 'string' then 'a string' when 'array' then 'an array' when 'object' then 'an object'
    else 'nothing' end
$$;

-- Unknown fields (serde's deny_unknown_fields) and missing required ones at one node.
create or replace function private.rule_json_field_problems(
  node jsonb, allowed text[], required text[], at text
) returns text[]
language sql immutable
set search_path = ''
as $$
  select coalesce(array_agg(problem order by n), '{}')
  from (
    select 1 as n, format('unknown field "%s" at %s', k, at) as problem
      from jsonb_object_keys(node) k where k <> all (allowed)
    union all
    select 2, format('missing field "%s" at %s', r, at)
      from unnest(required) r where not node ? r
  ) p
$$;

-- A whole number in 0..max (serde's u8/u32: no fraction, no exponent after jsonb's own
-- normalisation); null is fine where the Rust field is an Option.
create or replace function private.rule_json_uint_problems(
  node jsonb, field text, max numeric, nullable boolean, at text
) returns text[]
language plpgsql immutable
set search_path = ''
as $$
declare
  v jsonb := node -> field;
begin
  if v is null or (nullable and jsonb_typeof(v) = 'null') then
    return '{}';
  end if;
  if jsonb_typeof(v) <> 'number' or (v #>> '{}') !~ '^-?[0-9]+$' then
    return array[format('%s must be a whole number, found %s at %s', field,
      case when jsonb_typeof(v) = 'number' then v #>> '{}' else private.rule_json_kind(v) end, at)];
  end if;
  if (v #>> '{}')::numeric < 0 or (v #>> '{}')::numeric > max then
    return array[format('%s %s out of 0..%s at %s', field, v #>> '{}', max, at)];
  end if;
  return '{}';
end
$$;

-- A JSON number (serde's f64), optionally nullable and with a lower bound.
create or replace function private.rule_json_number_problems(
  node jsonb, field text, nullable boolean, min numeric, at text
) returns text[]
language plpgsql immutable
set search_path = ''
as $$
declare
  v jsonb := node -> field;
begin
  if v is null or (nullable and jsonb_typeof(v) = 'null') then
    return '{}';
  end if;
  if jsonb_typeof(v) <> 'number' then
    return array[format('%s must be a number, found %s at %s', field, private.rule_json_kind(v), at)];
  end if;
  if min is not null and (v #>> '{}')::numeric < min then
    return array[format('%s %s is negative at %s', field, v #>> '{}', at)];
  end if;
  return '{}';
end
$$;

-- A string; `nonblank` refuses "" and whitespace (the compiler's sensor names).
create or replace function private.rule_json_string_problems(
  node jsonb, field text, nonblank boolean, at text
) returns text[]
language plpgsql immutable
set search_path = ''
as $$
declare
  v jsonb := node -> field;
begin
  if v is null then
    return '{}';
  end if;
  if jsonb_typeof(v) <> 'string' then
    return array[format('%s must be a string, found %s at %s', field, private.rule_json_kind(v), at)];
  end if;
  if nonblank and (v #>> '{}') ~ '^\s*$' then
    return array[format('empty %s at %s', field, at)];
  end if;
  return '{}';
end
$$;

create or replace function private.rule_json_condition_problems(c jsonb, at text, depth integer)
returns text[]
language plpgsql immutable
set search_path = ''
as $$
declare
  p text[] := '{}';
  t text;
  f text;
  v jsonb;
  i integer;
begin
  if depth > 8 then
    return array[format('nesting deeper than 8 at %s', at)];
  end if;
  if jsonb_typeof(c) is distinct from 'object' then
    return array[format('expected a condition object, found %s at %s', private.rule_json_kind(c), at)];
  end if;
  if not c ? 'type' then
    return array[format('missing field "type" at %s', at)];
  end if;
  if jsonb_typeof(c -> 'type') <> 'string' then
    return array[format('"type" must be a string, found %s at %s', private.rule_json_kind(c -> 'type'), at)];
  end if;
  t := c ->> 'type';
  case t
  when 'sensor_compare', 'sensors_compare' then
    if t = 'sensor_compare' then
      p := p || private.rule_json_field_problems(c,
          array['type', 'sensor', 'operator', 'value', 'hysteresis', 'held_for_seconds'],
          array['sensor', 'operator', 'value'], at)
        || private.rule_json_number_problems(c, 'value', false, null, at)
        || private.rule_json_number_problems(c, 'hysteresis', true, 0, at);
    else
      p := p || private.rule_json_field_problems(c,
          array['type', 'sensor', 'operator', 'other_sensor', 'offset', 'held_for_seconds'],
          array['sensor', 'operator', 'other_sensor'], at)
        || private.rule_json_string_problems(c, 'other_sensor', true, at)
        || private.rule_json_number_problems(c, 'offset', false, null, at);
    end if;
    p := p || private.rule_json_string_problems(c, 'sensor', true, at)
      || private.rule_json_uint_problems(c, 'held_for_seconds', 4294967295, true, at);
    v := c -> 'operator';
    if v is not null and jsonb_typeof(v) <> 'string' then
      p := p || format('operator must be a string, found %s at %s', private.rule_json_kind(v), at);
    elsif v is not null and (v #>> '{}') <> all (array['<', '<=', '>', '>=', '==', '!=']) then
      p := p || format('operator "%s" not one of < <= > >= == != at %s', v #>> '{}', at);
    end if;
  when 'all', 'any' then
    p := p || private.rule_json_field_problems(c, array['type', 'conditions', 'held_for_seconds'],
        array['conditions'], at)
      || private.rule_json_uint_problems(c, 'held_for_seconds', 4294967295, true, at);
    v := c -> 'conditions';
    if v is not null and jsonb_typeof(v) <> 'array' then
      p := p || format('conditions must be an array, found %s at %s', private.rule_json_kind(v), at);
    elsif v is not null and jsonb_array_length(v) = 0 then
      p := p || format('empty %s at %s', t, at);
    elsif v is not null then
      for i in 0 .. jsonb_array_length(v) - 1 loop
        p := p || private.rule_json_condition_problems(v -> i, format('%s.conditions[%s]', at, i), depth + 1);
      end loop;
    end if;
  when 'not' then
    p := p || private.rule_json_field_problems(c, array['type', 'condition'], array['condition'], at);
    if c ? 'condition' then
      p := p || private.rule_json_condition_problems(c -> 'condition', at || '.condition', depth + 1);
    end if;
  when 'time_window' then
    p := p || private.rule_json_field_problems(c, array['type', 'from', 'to', 'days'],
        array['from', 'to'], at);
    foreach f in array array['from', 'to'] loop
      v := c -> f;
      if v is not null and jsonb_typeof(v) <> 'string' then
        p := p || format('%s must be a string, found %s at %s', f, private.rule_json_kind(v), at);
      elsif v is not null and (v #>> '{}') !~ '^([01][0-9]|2[0-3]):[0-5][0-9]$' then
        p := p || format('time "%s" is not HH:MM at %s', v #>> '{}', at);
      end if;
    end loop;
    v := c -> 'days';
    if v is not null and jsonb_typeof(v) <> 'null' then
      if jsonb_typeof(v) <> 'array' then
        p := p || format('days must be an array, found %s at %s', private.rule_json_kind(v), at);
      elsif jsonb_array_length(v) = 0 then
        p := p || format('empty days at %s', at);
      else
        p := p || coalesce((select array_agg(format('day %s is not one of mon tue wed thu fri sat sun at %s', d, at))
          from jsonb_array_elements(v) d
          where jsonb_typeof(d) <> 'string'
             or (d #>> '{}') <> all (array['mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun'])), '{}');
      end if;
    end if;
  when 'schedule' then
    -- Whether croner parses the expression is the agent's to say (last_error).
    p := p || private.rule_json_field_problems(c, array['type', 'cron'], array['cron'], at)
      || private.rule_json_string_problems(c, 'cron', false, at);
  else
    p := p || format('unknown condition type "%s" at %s', t, at);
  end case;
  return p;
end
$$;

create or replace function private.rule_json_action_problems(a jsonb, at text)
returns text[]
language plpgsql immutable
set search_path = ''
as $$
declare
  p text[] := '{}';
  t text;
  v jsonb;
begin
  if jsonb_typeof(a) is distinct from 'object' then
    return array[format('expected an action object, found %s at %s', private.rule_json_kind(a), at)];
  end if;
  if not a ? 'type' then
    return array[format('missing field "type" at %s', at)];
  end if;
  if jsonb_typeof(a -> 'type') <> 'string' then
    return array[format('"type" must be a string, found %s at %s', private.rule_json_kind(a -> 'type'), at)];
  end if;
  t := a ->> 'type';
  case t
  when 'relay_on', 'relay_off' then
    if t = 'relay_on' then
      p := p || private.rule_json_field_problems(a,
          array['type', 'slave_mac_address', 'relay_number', 'duration_seconds'],
          array['slave_mac_address', 'relay_number'], at)
        || private.rule_json_uint_problems(a, 'duration_seconds', 86400, false, at);
    else
      p := p || private.rule_json_field_problems(a, array['type', 'slave_mac_address', 'relay_number'],
          array['slave_mac_address', 'relay_number'], at);
    end if;
    p := p || private.rule_json_uint_problems(a, 'relay_number', 15, false, at);
    v := a -> 'slave_mac_address';
    if v is not null and jsonb_typeof(v) <> 'string' then
      p := p || format('slave_mac_address must be a string, found %s at %s', private.rule_json_kind(v), at);
    elsif v is not null and (v #>> '{}') !~ '^[0-9A-F]{2}(:[0-9A-F]{2}){5}$' then
      p := p || format('MAC "%s" is not upper-case XX:XX:XX:XX:XX:XX at %s', v #>> '{}', at);
    end if;
  when 'macro' then
    -- Whether the macro exists is the agent's to say (last_error).
    p := p || private.rule_json_field_problems(a, array['type', 'macro_id'], array['macro_id'], at)
      || private.rule_json_string_problems(a, 'macro_id', true, at);
  when 'mqtt_publish' then
    p := p || private.rule_json_field_problems(a, array['type', 'topic', 'payload', 'retain'],
        array['topic', 'payload'], at)
      || private.rule_json_string_problems(a, 'topic', false, at);
    v := a -> 'topic';
    if jsonb_typeof(v) = 'string' and ((v #>> '{}') = '' or (v #>> '{}') ~ '[#+]') then
      p := p || format('topic "%s" is empty or has a wildcard at %s', v #>> '{}', at);
    end if;
    v := a -> 'retain';
    if v is not null and jsonb_typeof(v) <> 'boolean' then
      p := p || format('retain must be a boolean, found %s at %s', private.rule_json_kind(v), at);
    end if;
  else
    p := p || format('unknown action type "%s" at %s', t, at);
  end case;
  return p;
end
$$;

-- Every problem of a rule_json, each ending in its JSON path; empty when the rule is valid.
-- In public (PostgREST: POST /rpc/rule_json_problems {"rule": ...}) so an editor can check a rule
-- before saving it. SECURITY DEFINER only to reach the private helpers, which no API role may
-- call; it reads nothing but its argument.
create or replace function public.rule_json_problems(rule jsonb) returns text[]
language plpgsql immutable security definer
set search_path = ''
as $$
declare
  p text[] := '{}';
  v jsonb;
  i integer;
begin
  if jsonb_typeof(rule) is distinct from 'object' then
    return array[format('expected an object, found %s at rule_json', private.rule_json_kind(rule))];
  end if;
  p := p || private.rule_json_field_problems(rule, array['conditions', 'actions'],
      array['conditions', 'actions'], 'rule_json');
  if rule ? 'conditions' then
    p := p || private.rule_json_condition_problems(rule -> 'conditions', 'conditions', 1);
  end if;
  v := rule -> 'actions';
  if v is not null and jsonb_typeof(v) <> 'array' then
    p := p || format('expected an array of actions, found %s at actions', private.rule_json_kind(v));
  elsif v is not null and jsonb_array_length(v) not between 1 and 32 then
    p := p || format('%s actions, 1 to 32 allowed at actions', jsonb_array_length(v));
  elsif v is not null then
    for i in 0 .. jsonb_array_length(v) - 1 loop
      p := p || private.rule_json_action_problems(v -> i, format('actions[%s]', i));
    end loop;
  end if;
  return p;
end
$$;

revoke all on function private.rule_json_kind(jsonb) from public, anon, authenticated, service_role;
revoke all on function private.rule_json_field_problems(jsonb, text[], text[], text) from public, anon, authenticated, service_role;
revoke all on function private.rule_json_uint_problems(jsonb, text, numeric, boolean, text) from public, anon, authenticated, service_role;
revoke all on function private.rule_json_number_problems(jsonb, text, boolean, numeric, text) from public, anon, authenticated, service_role;
revoke all on function private.rule_json_string_problems(jsonb, text, boolean, text) from public, anon, authenticated, service_role;
revoke all on function private.rule_json_condition_problems(jsonb, text, integer) from public, anon, authenticated, service_role;
revoke all on function private.rule_json_action_problems(jsonb, text) from public, anon, authenticated, service_role;
revoke all on function public.rule_json_problems(jsonb) from public, anon;
grant execute on function public.rule_json_problems(jsonb) to authenticated, service_role;

-- AFTER, not BEFORE: the table's own check constraints (decision_rules_rule_json_shape,
-- decision_rules_priority_range, ...) run first and keep their names in their refusals.
-- Only a rule_json that is new or changed is checked, so a row stored before this migration
-- stays readable, and the agent can still write its last_error to it or a dashboard disable it.
create or replace function private.decision_rules_check_rule_json() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  problems text[] := public.rule_json_problems(new.rule_json);
begin
  if cardinality(problems) > 0 then
    raise exception using
      errcode = '23514',
      message = 'decision_rules_rule_json_invalid: ' || array_to_string(problems, '; '),
      hint = 'rule_json must match schemas/rule_json.schema.json; POST /rpc/rule_json_problems checks a rule without saving it',
      table = 'decision_rules',
      column = 'rule_json',
      constraint = 'decision_rules_rule_json_invalid';
  end if;
  return null;
end
$$;

revoke all on function private.decision_rules_check_rule_json() from public, anon, authenticated, service_role;

drop trigger if exists decision_rules_rule_json_valid_on_insert on public.decision_rules;
create trigger decision_rules_rule_json_valid_on_insert after insert on public.decision_rules
  for each row execute function private.decision_rules_check_rule_json();
drop trigger if exists decision_rules_rule_json_valid_on_update on public.decision_rules;
create trigger decision_rules_rule_json_valid_on_update after update of rule_json on public.decision_rules
  for each row when (old.rule_json is distinct from new.rule_json)
  execute function private.decision_rules_check_rule_json();

-- ---------------------------------------------------------------------------
-- 2. Change feed for Supabase Realtime
-- ---------------------------------------------------------------------------
-- REPLICA IDENTITY FULL: an UPDATE or DELETE carries the whole old row, which Realtime needs to
-- apply RLS to it and to send `old` to the subscriber.
alter table public.relay_slaves replica identity full;
alter table public.device_status replica identity full;
alter table public.relay_commands_slave replica identity full;
alter table public.event_logs replica identity full;
alter table public.system_status replica identity full;
alter table public.rule_executions replica identity full;

-- Hosted Supabase creates supabase_realtime (sql/bootstrap does locally); add what is not in it
-- yet. A publication FOR ALL TABLES already has every table, and cannot take an ADD TABLE.
do $$
declare
  t text;
begin
  if not exists (select from pg_publication where pubname = 'supabase_realtime' and not puballtables) then
    return;
  end if;
  foreach t in array array['relay_slaves', 'device_status', 'relay_commands_slave', 'event_logs',
                           'system_status', 'rule_executions'] loop
    if not exists (select from pg_publication_tables
                   where pubname = 'supabase_realtime' and schemaname = 'public' and tablename = t) then
      execute format('alter publication supabase_realtime add table public.%I', t);
    end if;
  end loop;
end
$$;
