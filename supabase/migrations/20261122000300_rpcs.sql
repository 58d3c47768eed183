-- The RPCs of contract 1. Each is SECURITY DEFINER with a fixed search_path, checks the caller
-- itself through private.can_access_device, and returns nothing and changes nothing for a
-- device the caller may not see.

-- The expiry sweep of get_and_lock_slave_commands: a master's open commands by expiry, so that
-- the sweep is one index probe instead of a read of every open command of the master.
create index relay_commands_slave_expiry_idx on public.relay_commands_slave
  (master_device_id, expires_at)
  where status in ('pending', 'processing');

-- Hands out up to p_limit open commands of one master, locked for p_timeout_seconds, in the
-- order peristaltic > rule > automation > manual, priority DESC, created_at ASC. A command whose
-- lock is older than the timeout is handed out again (delivery_count tells how often); a command
-- past its expiry is never handed out and is marked expired.
create or replace function public.get_and_lock_slave_commands(
  p_master_device_id text,
  p_limit integer default 5,
  p_timeout_seconds integer default 30
)
returns setof public.relay_commands_slave
language plpgsql volatile security definer
set search_path = ''
-- With LIMIT p_limit unknown, the generic plan's estimate looks worse than a custom plan's, so
-- without this the hand-out query would be planned again on every call. Both plans are the same
-- walk of relay_commands_slave_queue_idx.
set plan_cache_mode = force_generic_plan
as $$
begin
  if p_limit is null or p_limit not between 1 and 100 then
    raise exception 'p_limit must be between 1 and 100, got %', p_limit using errcode = 'invalid_parameter_value';
  end if;
  if p_timeout_seconds is null or p_timeout_seconds not between 1 and 3600 then
    raise exception 'p_timeout_seconds must be between 1 and 3600, got %', p_timeout_seconds
      using errcode = 'invalid_parameter_value';
  end if;
  if not private.can_access_device(p_master_device_id) then
    return;
  end if;

  update public.relay_commands_slave c
     set status = 'expired',
         error_message = coalesce(c.error_message, 'expired before delivery')
   where c.id in (
     select e.id from public.relay_commands_slave e
      where e.master_device_id = p_master_device_id
        and e.status in ('pending', 'processing')
        and e.expires_at <= now()
        and (e.status = 'pending' or e.locked_at < now() - make_interval(secs => p_timeout_seconds))
      for update skip locked
   );

  return query
  with picked as (
    select c.id
      from public.relay_commands_slave c
     where c.master_device_id = p_master_device_id
       and c.status in ('pending', 'processing')
       and c.expires_at > now()
       and (c.status = 'pending' or c.locked_at < now() - make_interval(secs => p_timeout_seconds))
     order by c.type_rank, c.priority desc, c.created_at, c.id
     limit p_limit
     for update skip locked
  ),
  locked as (
    update public.relay_commands_slave c
       set status = 'processing',
           locked_at = now(),
           locked_by = coalesce(auth.jwt() ->> 'agent_id', auth.jwt() ->> 'device_id', session_user::text),
           delivery_count = c.delivery_count + 1
      from picked
     where c.id = picked.id
    returning c.*
  )
  select * from locked l order by l.type_rank, l.priority desc, l.created_at, l.id;
end
$$;

-- The seed's RPC for masters that evaluate rules themselves: enabled rules by priority.
create or replace function public.get_active_decision_rules(
  p_device_id text,
  p_limit integer default 10
)
returns setof public.decision_rules
language plpgsql stable security definer
set search_path = ''
as $$
begin
  if p_limit is null or p_limit not between 1 and 1000 then
    raise exception 'p_limit must be between 1 and 1000, got %', p_limit using errcode = 'invalid_parameter_value';
  end if;
  if not private.can_access_device(p_device_id) then
    return;
  end if;
  return query
  select r.* from public.decision_rules r
   where r.device_id = p_device_id and r.enabled
   order by r.priority desc, r.created_at, r.id
   limit p_limit;
end
$$;

-- Every change to a device's rules after the cursor (p_since, p_after_id): new, edited, disabled
-- and deleted rules (deleted = true, from the tombstones), ordered by (changed_at, id) so that
-- the last row of a page is the next cursor. changed_at is the writing transaction's start, so a
-- mirror re-reads a few seconds before its cursor and keeps the row with the higher revision.
create or replace function public.get_decision_rule_changes(
  p_device_id text,
  p_since timestamptz default '-infinity',
  p_after_id uuid default null,
  p_limit integer default 500
)
returns table (
  id uuid,
  device_id text,
  rule_id text,
  rule_name text,
  rule_description text,
  rule_json jsonb,
  enabled boolean,
  priority integer,
  cooldown_seconds integer,
  max_executions_per_hour integer,
  created_by text,
  created_at timestamptz,
  revision bigint,
  deleted boolean,
  changed_at timestamptz
)
language plpgsql stable security definer
set search_path = ''
as $$
declare
  v_after uuid := coalesce(p_after_id, '00000000-0000-0000-0000-000000000000'::uuid);
  v_since timestamptz := coalesce(p_since, '-infinity');
begin
  if p_limit is null or p_limit not between 1 and 5000 then
    raise exception 'p_limit must be between 1 and 5000, got %', p_limit using errcode = 'invalid_parameter_value';
  end if;
  if not private.can_access_device(p_device_id) then
    return;
  end if;
  return query
  select * from (
    select r.id, r.device_id, r.rule_id, r.rule_name, r.rule_description, r.rule_json, r.enabled,
           r.priority, r.cooldown_seconds, r.max_executions_per_hour, r.created_by, r.created_at,
           r.revision, false as deleted, r.updated_at as changed_at
      from public.decision_rules r
     where r.device_id = p_device_id and (r.updated_at, r.id) > (v_since, v_after)
    union all
    select t.id, t.device_id, t.rule_id, null, null, null, false,
           null, null, null, null, null,
           t.revision, true, t.deleted_at
      from public.decision_rule_tombstones t
     where t.device_id = p_device_id and (t.deleted_at, t.id) > (v_since, v_after)
  ) changes
  order by changes.changed_at, changes.id
  limit p_limit;
end
$$;

-- Relay states after a command's actions: relay n is element n + 1, unknown relays are off, and
-- the last action on a relay wins. plpgsql rather than SQL: it runs once per completion, and a
-- SQL function with SET search_path is planned again on every call.
create or replace function private.apply_relay_actions(
  p_states boolean[], p_relays integer[], p_actions text[]
) returns boolean[]
language plpgsql immutable
set search_path = ''
as $$
declare
  v_count integer := coalesce(cardinality(p_states), 0);
  v_states boolean[] := '{}';
begin
  for i in 1 .. coalesce(cardinality(p_relays), 0) loop
    if p_relays[i] >= 0 then
      v_count := greatest(v_count, p_relays[i] + 1);
    end if;
  end loop;
  if v_count = 0 then
    return null;
  end if;
  for i in 1 .. v_count loop
    v_states[i] := coalesce(p_states[i], false);
  end loop;
  for i in 1 .. coalesce(cardinality(p_relays), 0) loop
    if p_relays[i] >= 0 then
      v_states[p_relays[i] + 1] := coalesce(p_actions[i] = 'on', p_states[p_relays[i] + 1], false);
    end if;
  end loop;
  return v_states;
end
$$;

-- Records the relay states of the command's slave, as markCommandCompleted does in the seed. One
-- upsert: the conflict path locks the slave's row and applies the actions to its states as
-- they are then; a slave seen for the first time is taken to have 8 relays, all off, until it
-- reports.
create or replace function private.record_relay_states(
  p_command public.relay_commands_slave, p_relay_states boolean[]
) returns void
language plpgsql
set search_path = ''
as $$
begin
  insert into public.relay_slaves as s
    (master_device_id, slave_mac_address, slave_device_id, relay_count, relay_states, is_online, last_seen)
  select p_command.master_device_id, p_command.slave_mac_address, p_command.slave_device_id,
         greatest(8, cardinality(first.states)), first.states, true, now()
    from (select coalesce(p_relay_states,
                          private.apply_relay_actions(array_fill(false, array[8]),
                                                      p_command.relay_numbers, p_command.actions)) as states
         ) first
  on conflict (master_device_id, slave_mac_address) do update
    set relay_states = coalesce(p_relay_states,
                                private.apply_relay_actions(s.relay_states, p_command.relay_numbers, p_command.actions)),
        relay_count = greatest(s.relay_count,
                               cardinality(coalesce(p_relay_states,
                                                    private.apply_relay_actions(s.relay_states, p_command.relay_numbers,
                                                                                p_command.actions)))),
        slave_device_id = coalesce(excluded.slave_device_id, s.slave_device_id),
        is_online = true,
        last_seen = now();
end
$$;

-- Marks a command completed and records the slave's relay states. Idempotent: completing a
-- completed command changes nothing and returns it; a command that already failed, expired or
-- was cancelled is returned unchanged, so the caller learns its real status.
create or replace function public.complete_slave_command(
  p_command_id bigint,
  p_execution_time_ms integer default null,
  p_relay_states boolean[] default null
)
returns setof public.relay_commands_slave
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_cmd public.relay_commands_slave;
begin
  select * into v_cmd from public.relay_commands_slave where id = p_command_id for update;
  if not found or not private.can_access_device(v_cmd.master_device_id) then
    return;
  end if;
  if v_cmd.status in ('pending', 'processing', 'sent') then
    update public.relay_commands_slave
       set status = 'completed', completed_at = now(), execution_time_ms = p_execution_time_ms
     where id = p_command_id
    returning * into v_cmd;
    perform private.record_relay_states(v_cmd, p_relay_states);
  end if;
  return next v_cmd;
end
$$;

-- Marks a command failed with a reason; idempotent like complete_slave_command.
create or replace function public.fail_slave_command(
  p_command_id bigint,
  p_error_message text,
  p_execution_time_ms integer default null
)
returns setof public.relay_commands_slave
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_cmd public.relay_commands_slave;
begin
  if p_error_message is null or length(p_error_message) = 0 then
    raise exception 'p_error_message is required' using errcode = 'invalid_parameter_value';
  end if;
  select * into v_cmd from public.relay_commands_slave where id = p_command_id for update;
  if not found or not private.can_access_device(v_cmd.master_device_id) then
    return;
  end if;
  if v_cmd.status in ('pending', 'processing', 'sent') then
    update public.relay_commands_slave
       set status = 'failed', completed_at = now(), execution_time_ms = p_execution_time_ms,
           error_message = left(p_error_message, 1000)
     where id = p_command_id
    returning * into v_cmd;
  end if;
  return next v_cmd;
end
$$;

revoke all on function public.get_and_lock_slave_commands(text, integer, integer) from public, anon;
revoke all on function public.get_active_decision_rules(text, integer) from public, anon;
revoke all on function public.get_decision_rule_changes(text, timestamptz, uuid, integer) from public, anon;
revoke all on function public.complete_slave_command(bigint, integer, boolean[]) from public, anon;
revoke all on function public.fail_slave_command(bigint, text, integer) from public, anon;
revoke all on function private.can_access_device(text) from public;
revoke all on function private.apply_relay_actions(boolean[], integer[], text[]) from public;
revoke all on function private.record_relay_states(public.relay_commands_slave, boolean[]) from public;
grant execute on function public.get_and_lock_slave_commands(text, integer, integer) to authenticated, service_role;
grant execute on function public.get_active_decision_rules(text, integer) to authenticated, service_role;
grant execute on function public.get_decision_rule_changes(text, timestamptz, uuid, integer) to authenticated, service_role;
grant execute on function public.complete_slave_command(bigint, integer, boolean[]) to authenticated, service_role;
grant execute on function public.fail_slave_command(bigint, text, integer) to authenticated, service_role;
