-- sync_agent (decision 21), two changes to what a retried request id gets:
-- 1. Serialised per agent past its idle path: two calls with the same p_request_id that ran at
--    once (a retry and the lost call it repeats, both released when a frozen PostgREST resumed)
--    each locked commands, and the agent heard of one set only; the other stayed locked until
--    the lock timeout.
-- 2. A retry gets what the lost call locked whatever limits it asks for now. The agent's first
--    call after a failure asks for no new commands while completions wait (completions go
--    first); that call was answered without the lost call's commands, the agent took the
--    request as answered, and those commands stayed locked until the lock timeout (the fault
--    suite's long run, seed 11: a 23 s drain after PostgREST's last freeze).
-- The function is 20261204000100's with these two changes.

create or replace function public.sync_agent(
  p_cursor jsonb default '{}'::jsonb,
  p_masters text[] default null,
  p_limit_per_master integer default 50,
  p_limit_total integer default 100,
  p_timeout_seconds integer default 30,
  p_request_id text default null
)
returns jsonb
language plpgsql volatile security definer
set search_path = ''
set plan_cache_mode = force_generic_plan
as $$
declare
  v_agent text := auth.jwt() ->> 'agent_id';
  v_owner uuid := auth.uid();
  v_cursor jsonb := coalesce(p_cursor, '{}'::jsonb);
  v_state private.agent_sync_state;
  v_locker text;
  v_masters text[];
  v_ids bigint[];
  v_due timestamptz;
  v_rules jsonb := '[]'::jsonb;
  v_page jsonb;
  v_more boolean := false;
  v_master text;
  v_rule_limit constant integer := 500;
  v_out jsonb;
  v_next jsonb;
begin
  if p_limit_per_master is null or p_limit_per_master not between 0 and 100 then
    raise exception 'p_limit_per_master must be between 0 and 100, got %', p_limit_per_master
      using errcode = 'invalid_parameter_value';
  end if;
  if p_limit_total is null or p_limit_total not between 0 and 100 then
    raise exception 'p_limit_total must be between 0 and 100, got %', p_limit_total
      using errcode = 'invalid_parameter_value';
  end if;
  if p_timeout_seconds is null or p_timeout_seconds not between 1 and 3600 then
    raise exception 'p_timeout_seconds must be between 1 and 3600, got %', p_timeout_seconds
      using errcode = 'invalid_parameter_value';
  end if;
  if p_request_id is not null and p_request_id !~ '^[A-Za-z0-9_-]{8,64}$' then
    raise exception 'p_request_id must be 8..64 characters of A-Z a-z 0-9 _ -'
      using errcode = 'invalid_parameter_value';
  end if;
  if jsonb_typeof(v_cursor) is distinct from 'object' then
    raise exception 'p_cursor must be a JSON object' using errcode = 'invalid_parameter_value';
  end if;

  -- The idle path: one read of the agent's row (and of its live edge_agents row, which is who
  -- the caller is), nothing else.
  select s.* into v_state
    from private.agent_sync_state s
    join public.edge_agents a on a.agent_id = s.agent_id
   where s.agent_id = v_agent and a.owner_id = v_owner and a.revoked_at is null;
  if found
     and (v_cursor ->> 'rules')::bigint = v_state.rules_seq
     and (v_cursor ->> 'configs')::bigint = v_state.configs_seq
     and (v_cursor ->> 'macros')::bigint = v_state.macros_seq
     and (v_cursor ->> 'latch')::bigint = v_state.latch_seq
     -- A retried request id is never idle: it gets what the lost call locked, whatever
     -- limits it asks for now.
     and (p_request_id is null or p_request_id is distinct from v_state.last_request_id)
     and (p_limit_total = 0 or p_limit_per_master = 0
          or ((v_cursor ->> 'commands')::bigint = v_state.commands_seq
              and (v_state.commands_due_at is null or v_state.commands_due_at > now()))) then
    return '{"idle": true}'::jsonb;
  end if;

  if not found then
    if private.caller_kind() is distinct from 'agent' then
      raise exception 'sync_agent_refused: only a live edge agent syncs (a token with agent_id, not revoked)'
        using errcode = 'insufficient_privilege';
    end if;
    insert into private.agent_sync_state (agent_id) values (v_agent) on conflict do nothing;
    select s.* into v_state from private.agent_sync_state s where s.agent_id = v_agent;
  end if;

  -- Past the idle path, one call per agent at a time: calls that share a request id (a retry
  -- sent while the lost call was still queued behind a frozen PostgREST) would otherwise both
  -- miss each other's record and lock two sets, one of which nobody ever hears of. The row
  -- read again under its lock has the other call's record.
  select s.* into v_state from private.agent_sync_state s where s.agent_id = v_agent for update;

  v_locker := 'agent:' || v_agent;
  v_masters := array(
    select d.device_id from public.device_status d
     where d.agent_id = v_agent and d.owner_id = v_owner
       and (p_masters is null or d.device_id = any(p_masters))
     order by d.device_id);
  v_next := jsonb_build_object('rules', v_state.rules_seq, 'configs', v_state.configs_seq,
                               'macros', v_state.macros_seq, 'latch', v_state.latch_seq,
                               'commands', v_cursor -> 'commands');
  v_out := jsonb_build_object('idle', false);

  -- Commands.
  if (p_limit_total > 0 and p_limit_per_master > 0)
     or (p_request_id is not null and p_request_id = v_state.last_request_id) then
    if p_request_id is not null and p_request_id = v_state.last_request_id then
      -- A retry of a call whose answer was lost: the same rows again, as they are now, for as
      -- long as this agent still holds their lock; nothing new is locked, and the commands
      -- counter stays, so the next call looks again. Also when the retry asks for no new
      -- commands (completions first): what was locked for it must reach it all the same.
      v_out := v_out || jsonb_build_object('commands', coalesce((
        select jsonb_agg(to_jsonb(c) order by c.type_rank, c.priority desc, c.created_at, c.id)
          from public.relay_commands_slave c
         where c.id = any(v_state.last_command_ids) and c.status = 'processing'
           and c.locked_by = v_locker), '[]'::jsonb));
    elsif p_limit_total > 0 and p_limit_per_master > 0
          and ((v_cursor ->> 'commands')::bigint is distinct from v_state.commands_seq
               or v_state.commands_due_at <= now()) then
      update public.relay_commands_slave c
         set status = 'expired',
             error_message = coalesce(c.error_message, 'expired before delivery')
       where c.id in (
         select e.id from public.relay_commands_slave e
          where e.master_device_id = any(v_masters)
            and e.status in ('pending', 'processing')
            and e.expires_at <= now()
            and (e.status = 'pending' or e.locked_at < now() - make_interval(secs => p_timeout_seconds))
          for update skip locked
       );

      -- Each master's first commands in the seed's order (through the queue index), then
      -- round-robin across masters up to the total: a master's backlog never starves another.
      with candidates as (
        select c.id, c.type_rank, c.priority, c.created_at,
               row_number() over (partition by m.master
                                  order by c.type_rank, c.priority desc, c.created_at, c.id) as turn
          from unnest(v_masters) as m(master)
          cross join lateral (
            select q.id, q.type_rank, q.priority, q.created_at
              from public.relay_commands_slave q
             where q.master_device_id = m.master
               and q.status in ('pending', 'processing')
               and q.expires_at > now()
               and (q.status = 'pending' or q.locked_at < now() - make_interval(secs => p_timeout_seconds))
             order by q.type_rank, q.priority desc, q.created_at, q.id
             limit p_limit_per_master
          ) c
      ),
      chosen as (
        select ca.id from candidates ca
         order by ca.turn, ca.type_rank, ca.priority desc, ca.created_at, ca.id
         limit p_limit_total
      ),
      picked as (
        select c.id from public.relay_commands_slave c
         where c.id in (select id from chosen)
           and c.status in ('pending', 'processing')
           and c.expires_at > now()
           and (c.status = 'pending' or c.locked_at < now() - make_interval(secs => p_timeout_seconds))
         for update skip locked
      ),
      locked as (
        update public.relay_commands_slave c
           set status = 'processing',
               locked_at = now(),
               locked_by = v_locker,
               delivery_count = c.delivery_count + 1
          from picked
         where c.id = picked.id
        returning c.id
      )
      select coalesce(array_agg(l.id), '{}') into v_ids from locked l;

      v_out := v_out || jsonb_build_object('commands', coalesce((
        select jsonb_agg(to_jsonb(c) order by c.type_rank, c.priority desc, c.created_at, c.id)
          from public.relay_commands_slave c where c.id = any(v_ids)), '[]'::jsonb));

      -- When to look again without a new command: at once while some are left open (the
      -- limits, or a row another caller held), else when the oldest lock times out.
      if exists (select 1 from public.relay_commands_slave c
                  where c.master_device_id = any(v_masters) and c.status = 'pending'
                    and c.expires_at > now()) then
        v_due := now();
      else
        select min(c.locked_at) + make_interval(secs => p_timeout_seconds) into v_due
          from public.relay_commands_slave c
         where c.master_device_id = any(v_masters) and c.status = 'processing';
      end if;
      update private.agent_sync_state s
         set commands_due_at = v_due,
             last_request_id = coalesce(p_request_id, s.last_request_id),
             last_command_ids = case when p_request_id is null then s.last_command_ids else v_ids end
       where s.agent_id = v_agent;
      v_next := jsonb_set(v_next, '{commands}', to_jsonb(v_state.commands_seq));
    else
      v_next := jsonb_set(v_next, '{commands}', to_jsonb(v_state.commands_seq));
    end if;
  end if;

  -- Rule changes after each master's cursor, a page per master.
  if (v_cursor ->> 'rules')::bigint is distinct from v_state.rules_seq then
    foreach v_master in array v_masters loop
      select coalesce(jsonb_agg(to_jsonb(r)), '[]'::jsonb) into v_page
        from public.get_decision_rule_changes(
          v_master,
          coalesce((v_cursor #>> array['rule_cursors', v_master, 'since'])::timestamptz, '-infinity'),
          (v_cursor #>> array['rule_cursors', v_master, 'after'])::uuid,
          v_rule_limit) r;
      v_rules := v_rules || v_page;
      v_more := v_more or jsonb_array_length(v_page) >= v_rule_limit;
    end loop;
    v_out := v_out || jsonb_build_object('rules', v_rules, 'rules_more', v_more);
    if v_more then
      -- Not caught up: the next call reads rules again from the advanced cursors.
      v_next := jsonb_set(v_next, '{rules}', coalesce(v_cursor -> 'rules', 'null'::jsonb));
    end if;
  end if;

  if (v_cursor ->> 'configs')::bigint is distinct from v_state.configs_seq then
    v_out := v_out || jsonb_build_object('configs', coalesce((
      select jsonb_agg(jsonb_build_object('device_id', d.device_id, 'config', d.config,
                                          'config_version', d.config_version) order by d.device_id)
        from public.device_status d where d.device_id = any(v_masters)), '[]'::jsonb));
  end if;

  if (v_cursor ->> 'macros')::bigint is distinct from v_state.macros_seq then
    v_out := v_out || jsonb_build_object('macros', coalesce((
      select jsonb_agg(jsonb_build_object(
               'id', m.id, 'name', m.name, 'description', m.description, 'enabled', m.enabled,
               'revision', m.revision,
               'macro_actions', coalesce((
                 select jsonb_agg(to_jsonb(a) order by a.sequence)
                   from public.macro_actions a where a.macro_id = m.id), '[]'::jsonb))
             order by m.id)
        from public.macros m where m.agent_id = v_agent and m.owner_id = v_owner), '[]'::jsonb));
  end if;

  if (v_cursor ->> 'latch')::bigint is distinct from v_state.latch_seq then
    v_out := v_out || jsonb_build_object('latch', (
      select jsonb_build_object('owner_id', s.owner_id, 'emergency_stop', s.emergency_stop,
                                'emergency_reason', s.emergency_reason,
                                'emergency_changed_at', s.emergency_changed_at,
                                'emergency_changed_by', s.emergency_changed_by)
        from public.system_status s where s.owner_id = v_owner));
  end if;

  return v_out || jsonb_build_object('cursor', v_next);
end
$$;
