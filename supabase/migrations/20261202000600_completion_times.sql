-- What the cloud records is when things happened (issue 11, point 12c): a completion pushed
-- after an outage carried only the push time, so completed_at said 11:03:49 for a relay that
-- switched at 10:55:32, and sent_at stayed empty. complete_slave_commands now takes each
-- command's finished_at (when its master answered) and sent_at (when the edge sent it), bounded
-- by the command's creation and the present; without them it records now(), as before.
-- Runs unchanged on hosted Supabase; every statement can run twice.

create or replace function public.complete_slave_commands(p_completions jsonb)
returns setof public.relay_commands_slave
language plpgsql volatile security definer
set search_path = ''
-- The statements below take the batch's ids as arrays; with custom plans (the default, since
-- a generic plan's estimates look worse) each would be planned again on every call, which cost
-- more than running them. Their generic plans are the same primary-key lookups.
set plan_cache_mode = force_generic_plan
as $$
declare
  v_count integer;
  v_elem jsonb;
  v_pos bigint;
  v_status text;
  v_ids bigint[] := '{}';
  v_pos_of bigint[] := '{}';
  v_statuses text[] := '{}';
  v_times integer[] := '{}';
  v_errors text[] := '{}';
  v_states jsonb[] := '{}';
  v_finished timestamptz[] := '{}';
  v_sent timestamptz[] := '{}';
  v_at timestamptz;
  v_key text;
  v_masters text[];
  v_master text;
  v_allowed text[] := '{}';
  v_done bigint[];
begin
  if p_completions is null or jsonb_typeof(p_completions) <> 'array' then
    raise exception 'p_completions must be a JSON array of completions'
      using errcode = 'invalid_parameter_value';
  end if;
  v_count := jsonb_array_length(p_completions);
  if v_count > 100 then
    raise exception 'p_completions may hold at most 100 completions, got %', v_count
      using errcode = 'invalid_parameter_value';
  end if;
  if v_count = 0 then
    return;
  end if;

  -- Validate every element before touching anything.
  for v_elem, v_pos in select e, o from jsonb_array_elements(p_completions) with ordinality t(e, o) loop
    if jsonb_typeof(v_elem) is distinct from 'object' then
      raise exception 'p_completions[%] must be an object', v_pos - 1 using errcode = 'invalid_parameter_value';
    end if;
    if v_elem - array['command_id', 'status', 'execution_time_ms', 'relay_states', 'error_message',
                      'finished_at', 'sent_at'] <> '{}'::jsonb then
      raise exception 'p_completions[%] has unknown keys: %', v_pos - 1,
        (select string_agg(k, ', ') from jsonb_object_keys(v_elem - array['command_id', 'status', 'execution_time_ms',
                                                                         'relay_states', 'error_message',
                                                                         'finished_at', 'sent_at']) k)
        using errcode = 'invalid_parameter_value';
    end if;
    -- When the master answered and when the command went out, as the edge saw them: a
    -- completion pushed after an outage keeps its own time, not the push's.
    foreach v_key in array array['finished_at', 'sent_at'] loop
      if coalesce(jsonb_typeof(v_elem -> v_key), 'null') <> 'null' then
        begin
          if jsonb_typeof(v_elem -> v_key) <> 'string' then
            raise exception using errcode = 'invalid_datetime_format';
          end if;
          v_at := (v_elem ->> v_key)::timestamptz;
        exception when others then
          raise exception 'p_completions[%].% must be null or an RFC 3339 time', v_pos - 1, v_key
            using errcode = 'invalid_parameter_value';
        end;
      end if;
    end loop;
    if jsonb_typeof(v_elem -> 'command_id') is distinct from 'number'
       or (v_elem ->> 'command_id') !~ '^[0-9]{1,18}$' then
      raise exception 'p_completions[%].command_id must be a positive whole number', v_pos - 1
        using errcode = 'invalid_parameter_value';
    end if;
    if (v_elem ->> 'command_id')::bigint = any (v_ids) then
      raise exception 'p_completions[%].command_id % appears more than once', v_pos - 1, v_elem ->> 'command_id'
        using errcode = 'invalid_parameter_value';
    end if;
    v_status := v_elem ->> 'status';
    if jsonb_typeof(v_elem -> 'status') is distinct from 'string' or v_status not in ('completed', 'failed') then
      raise exception 'p_completions[%].status must be "completed" or "failed"', v_pos - 1
        using errcode = 'invalid_parameter_value';
    end if;
    if coalesce(jsonb_typeof(v_elem -> 'execution_time_ms'), 'null') <> 'null'
       and (jsonb_typeof(v_elem -> 'execution_time_ms') <> 'number'
            or (v_elem ->> 'execution_time_ms') !~ '^[0-9]{1,9}$') then
      raise exception 'p_completions[%].execution_time_ms must be null or a whole number of milliseconds', v_pos - 1
        using errcode = 'invalid_parameter_value';
    end if;
    if coalesce(jsonb_typeof(v_elem -> 'relay_states'), 'null') <> 'null' then
      if v_status <> 'completed' then
        raise exception 'p_completions[%].relay_states is only for completed commands', v_pos - 1
          using errcode = 'invalid_parameter_value';
      end if;
      if jsonb_typeof(v_elem -> 'relay_states') <> 'array'
         or exists (select 1 from jsonb_array_elements(v_elem -> 'relay_states') s
                     where jsonb_typeof(s) not in ('boolean', 'null')) then
        raise exception 'p_completions[%].relay_states must be null or an array of booleans', v_pos - 1
          using errcode = 'invalid_parameter_value';
      end if;
    end if;
    if coalesce(jsonb_typeof(v_elem -> 'error_message'), 'null') <> 'null' then
      if jsonb_typeof(v_elem -> 'error_message') <> 'string' then
        raise exception 'p_completions[%].error_message must be null or text', v_pos - 1
          using errcode = 'invalid_parameter_value';
      end if;
      if v_status = 'completed' then
        raise exception 'p_completions[%].error_message is only for failed commands', v_pos - 1
          using errcode = 'invalid_parameter_value';
      end if;
    end if;
    if v_status = 'failed' and coalesce(length(v_elem ->> 'error_message'), 0) = 0 then
      raise exception 'p_completions[%].error_message is required for a failed command', v_pos - 1
        using errcode = 'invalid_parameter_value';
    end if;
    v_ids := array_append(v_ids, (v_elem ->> 'command_id')::bigint);
    v_pos_of := array_append(v_pos_of, v_pos);
    v_statuses := array_append(v_statuses, v_status);
    v_times := array_append(v_times, (v_elem ->> 'execution_time_ms')::integer);
    v_errors := array_append(v_errors, v_elem ->> 'error_message');
    v_states := array_append(v_states, v_elem -> 'relay_states');
    v_finished := array_append(v_finished, (v_elem ->> 'finished_at')::timestamptz);
    v_sent := array_append(v_sent, (v_elem ->> 'sent_at')::timestamptz);
  end loop;

  -- Access, once per distinct master. master_device_id never changes (guard_relay_command), so
  -- it can be read before locking; commands of other masters are neither locked nor changed.
  select array_agg(distinct c.master_device_id order by c.master_device_id) into v_masters
    from public.relay_commands_slave c
   where c.id = any (v_ids);
  foreach v_master in array coalesce(v_masters, '{}') loop
    if private.can_access_device(v_master) then
      v_allowed := array_append(v_allowed, v_master);
    end if;
  end loop;
  if cardinality(v_allowed) = 0 then
    return;
  end if;

  -- Lock the caller's commands in id order.
  perform 1 from public.relay_commands_slave c
   where c.id = any (v_ids) and c.master_device_id = any (v_allowed)
   order by c.id
   for update;

  -- All outcomes in one statement; commands no longer open are left as they are.
  with done as (
  update public.relay_commands_slave c
     set status = i.status,
         -- Never before the command existed, never in the future (an edge clock off by a
         -- little must not break the table's order of events).
         completed_at = least(greatest(coalesce(i.finished_at, now()), c.created_at), now()),
         sent_at = coalesce(c.sent_at, least(greatest(i.sent_at, c.created_at), now())),
         execution_time_ms = i.execution_time_ms,
         error_message = case when i.status = 'failed' then left(i.error_message, 1000) else c.error_message end
    from unnest(v_ids, v_statuses, v_times, v_errors, v_finished, v_sent)
           as i(command_id, status, execution_time_ms, error_message, finished_at, sent_at)
   where c.id = i.command_id
     and c.master_device_id = any (v_allowed)
     and c.status in ('pending', 'processing', 'sent')
  returning c.id
  )
  select coalesce(array_agg(done.id), '{}') into v_done from done;

  if cardinality(v_done) > 0 then
    -- Relay states of the commands this call completed, each slave's row written once. First
    -- lock the slaves in (master_device_id, slave_mac_address) order, creating a slave seen for
    -- the first time as record_relay_states would (8 relays, all off, until it reports): the
    -- DO UPDATE ... WHERE false locks an existing row without writing it.
    insert into public.relay_slaves as s
      (master_device_id, slave_mac_address, relay_count, relay_states, is_online, last_seen)
    select k.master_device_id, k.slave_mac_address, 8, array_fill(false, array[8]), true, now()
      from (select distinct c.master_device_id, c.slave_mac_address
              from public.relay_commands_slave c
             where c.id = any (v_done) and c.status = 'completed') k
     order by k.master_device_id, k.slave_mac_address
    on conflict (master_device_id, slave_mac_address) do update
      set last_seen = excluded.last_seen
      where false;

    -- Then apply each slave's commands in the batch's order, in one statement.
    update public.relay_slaves s
       set (relay_states, relay_count) =
             (select f.states, greatest(s.relay_count, f.relay_count)
                from private.fold_relay_states(s.relay_states, g.commands, g.reported) f),
           slave_device_id = coalesce(g.slave_device_id, s.slave_device_id),
           is_online = true,
           last_seen = now()
      from (select c.master_device_id, c.slave_mac_address,
                   array_agg(c order by i.pos) as commands,
                   array_agg(i.states order by i.pos) as reported,
                   (array_agg(c.slave_device_id order by i.pos desc)
                      filter (where c.slave_device_id is not null))[1] as slave_device_id
              from unnest(v_ids, v_pos_of, v_states) as i(command_id, pos, states)
              join public.relay_commands_slave c on c.id = i.command_id
             where c.id = any (v_done) and c.status = 'completed'
             group by c.master_device_id, c.slave_mac_address) g
     where s.master_device_id = g.master_device_id and s.slave_mac_address = g.slave_mac_address;
  end if;

  return query
  select c.*
    from unnest(v_ids, v_pos_of) as i(command_id, pos)
    join public.relay_commands_slave c on c.id = i.command_id
   where c.master_device_id = any (v_allowed)
   order by i.pos;
end
$$;

comment on function public.complete_slave_commands(jsonb) is
  'Completes or fails up to 100 commands in one call; idempotent like complete_slave_command and fail_slave_command.';

revoke all on function public.complete_slave_commands(jsonb) from public, anon;
grant execute on function public.complete_slave_commands(jsonb) to authenticated, service_role;

-- create or replace drops the function's settings: the relay-state recording mode again.
alter function public.complete_slave_commands(jsonb) set autocore.relay_states_by_rpc = 'on';
