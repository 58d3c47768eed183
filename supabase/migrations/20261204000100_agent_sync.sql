-- One sync per agent per tick (issue 15, points 1 and 3; docs/decisions/0021-one-sync-per-agent.md).
-- sync_agent answers, in one round trip, everything new for all the masters an agent serves:
-- commands to lock (the seed's order, a limit per master and in total), rule changes after the
-- agent's cursors, the emergency latch, device-config versions and the macros. Triggers keep one
-- small row per agent with a counter per kind of change, so an idle call reads that row, finds
-- the agent's cursor equal to it and returns without touching the big tables.
-- get_and_lock_slave_commands stays as it is for masters that poll the backend themselves.
-- Runs unchanged on hosted Supabase; every statement can run twice.

create table if not exists private.agent_sync_state (
  agent_id text primary key references public.edge_agents (agent_id) on delete cascade,
  -- Moved by the triggers below when something of that kind changed for this agent.
  commands_seq bigint not null default 1,
  rules_seq bigint not null default 1,
  configs_seq bigint not null default 1,
  macros_seq bigint not null default 1,
  latch_seq bigint not null default 1,
  -- When commands must be looked at again although no counter moved: a lock that times out,
  -- or commands left behind by the limits (now). Null: nothing open.
  commands_due_at timestamptz,
  -- The last call that locked commands, so that its retry gets them again (as
  -- command_lock_requests does for get_and_lock_slave_commands).
  last_request_id text,
  last_command_ids bigint[] not null default '{}'
) with (fillfactor = 50);
comment on table private.agent_sync_state is
  'One row per edge agent: change counters bumped by triggers, read by sync_agent (decision 0021).';

-- Bumps the counters of these agents (creating their rows). Agents are taken in order, so two
-- writers never wait for each other's rows in opposite orders.
create or replace function private.bump_agent_sync(
  p_agents text[], p_commands boolean, p_rules boolean, p_configs boolean, p_macros boolean,
  p_latch boolean
) returns void
language plpgsql volatile security definer
set search_path = ''
as $$
begin
  if p_agents is null or cardinality(p_agents) = 0 then
    return;
  end if;
  insert into private.agent_sync_state as s (agent_id)
  select a.agent_id from public.edge_agents a
   where a.agent_id = any(p_agents)
   order by a.agent_id
  on conflict (agent_id) do update set
    commands_seq = s.commands_seq + p_commands::int,
    rules_seq = s.rules_seq + p_rules::int,
    configs_seq = s.configs_seq + p_configs::int,
    macros_seq = s.macros_seq + p_macros::int,
    latch_seq = s.latch_seq + p_latch::int;
end
$$;

-- New commands: once per statement, so a bulk insert of thousands moves the counter once.
create or replace function private.sync_on_new_commands() returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  perform private.bump_agent_sync(array(
    select distinct d.agent_id
      from new_commands n join public.device_status d on d.device_id = n.master_device_id
     where n.status = 'pending' and d.agent_id is not null), true, false, false, false, false);
  return null;
end
$$;
drop trigger if exists relay_commands_slave_sync_insert on public.relay_commands_slave;
create trigger relay_commands_slave_sync_insert after insert on public.relay_commands_slave
  referencing new table as new_commands
  for each statement execute function private.sync_on_new_commands();

-- A command put back to pending (by hand) is new work too.
create or replace function private.sync_on_command_pending() returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  perform private.bump_agent_sync(array(
    select d.agent_id from public.device_status d where d.device_id = new.master_device_id),
    true, false, false, false, false);
  return null;
end
$$;
drop trigger if exists relay_commands_slave_sync_pending on public.relay_commands_slave;
create trigger relay_commands_slave_sync_pending after update of status on public.relay_commands_slave
  for each row when (new.status = 'pending' and old.status is distinct from 'pending')
  execute function private.sync_on_command_pending();

-- Rules: a new, edited or deleted rule (the engine's last_error alone keeps the revision).
create or replace function private.sync_on_rule_change() returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  v_devices text[];
begin
  v_devices := case tg_op
    when 'INSERT' then array[new.device_id]
    when 'DELETE' then array[old.device_id]
    else array[new.device_id, old.device_id]
  end;
  perform private.bump_agent_sync(array(
    select d.agent_id from public.device_status d where d.device_id = any(v_devices)),
    false, true, false, false, false);
  return null;
end
$$;
drop trigger if exists decision_rules_sync_insert_delete on public.decision_rules;
create trigger decision_rules_sync_insert_delete after insert or delete on public.decision_rules
  for each row execute function private.sync_on_rule_change();
drop trigger if exists decision_rules_sync_update on public.decision_rules;
create trigger decision_rules_sync_update after update on public.decision_rules
  for each row when (old.revision is distinct from new.revision or old.device_id is distinct from new.device_id)
  execute function private.sync_on_rule_change();

-- Devices: a configuration authored, or a master given to (or taken from) an agent. Presence
-- updates (is_online, last_seen, rssi) move nothing.
create or replace function private.sync_on_device_change() returns trigger
language plpgsql security definer
set search_path = ''
as $$
declare
  v_reassigned boolean := tg_op <> 'UPDATE' or old.agent_id is distinct from new.agent_id;
begin
  perform private.bump_agent_sync(array[
      case when tg_op <> 'DELETE' then new.agent_id end,
      case when tg_op <> 'INSERT' then old.agent_id end],
    v_reassigned, v_reassigned, true, false, false);
  return null;
end
$$;
drop trigger if exists device_status_sync_insert_delete on public.device_status;
create trigger device_status_sync_insert_delete after insert or delete on public.device_status
  for each row execute function private.sync_on_device_change();
drop trigger if exists device_status_sync_update on public.device_status;
create trigger device_status_sync_update after update on public.device_status
  for each row when (old.config_version is distinct from new.config_version
                     or old.config is distinct from new.config
                     or old.agent_id is distinct from new.agent_id)
  execute function private.sync_on_device_change();

-- Macros and their steps.
create or replace function private.sync_on_macro_change() returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  perform private.bump_agent_sync(array[
      case when tg_op <> 'DELETE' then new.agent_id end,
      case when tg_op <> 'INSERT' then old.agent_id end],
    false, false, false, true, false);
  return null;
end
$$;
drop trigger if exists macros_sync on public.macros;
create trigger macros_sync after insert or update or delete on public.macros
  for each row execute function private.sync_on_macro_change();

create or replace function private.sync_on_macro_action_change() returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  perform private.bump_agent_sync(array(
    select m.agent_id from public.macros m
     where m.id in (case when tg_op <> 'DELETE' then new.macro_id end,
                    case when tg_op <> 'INSERT' then old.macro_id end)),
    false, false, false, true, false);
  return null;
end
$$;
drop trigger if exists macro_actions_sync on public.macro_actions;
create trigger macro_actions_sync after insert or update or delete on public.macro_actions
  for each row execute function private.sync_on_macro_action_change();

-- The emergency latch is the owner's: every agent of the owner hears of it.
create or replace function private.sync_on_latch_change() returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  perform private.bump_agent_sync(array(
    select a.agent_id from public.edge_agents a where a.owner_id = new.owner_id),
    false, false, false, false, true);
  return null;
end
$$;
drop trigger if exists system_status_sync on public.system_status;
create trigger system_status_sync after insert or update on public.system_status
  for each row execute function private.sync_on_latch_change();

-- ---------------------------------------------------------------------------
-- sync_agent
-- ---------------------------------------------------------------------------
-- p_cursor: {"commands": n, "rules": n, "configs": n, "macros": n, "latch": n} as the last
--   answer gave them (a missing counter: read that part), plus "rule_cursors":
--   {"<master>": {"since": timestamptz, "after": uuid}} (missing: from the beginning).
-- p_masters: the masters the agent runs (null: all the backend gives it); only these are synced.
-- p_limit_per_master, p_limit_total: how many commands to lock, 0..100 (total 0: lock none, as
--   while completions are due; the commands counter then stays where the cursor had it).
-- p_request_id: names the call; repeated after a lost answer, it returns what that call locked.
-- Answer: {"idle": true} when nothing moved, else {"idle": false, "cursor": {counters},
--   and the parts that moved: "commands": [rows], "rules": [changes], "rules_more": bool,
--   "configs": [{device_id, config, config_version}], "macros": [macro with macro_actions],
--   "latch": system_status row or null}.
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
     and (p_limit_total = 0 or p_limit_per_master = 0
          or ((v_cursor ->> 'commands')::bigint = v_state.commands_seq
              and (v_state.commands_due_at is null or v_state.commands_due_at > now())
              and (p_request_id is null or p_request_id is distinct from v_state.last_request_id))) then
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
  if p_limit_total > 0 and p_limit_per_master > 0 then
    if p_request_id is not null and p_request_id = v_state.last_request_id then
      -- A retry of a call whose answer was lost: the same rows again, as they are now, for as
      -- long as this agent still holds their lock; nothing new is locked, and the commands
      -- counter stays, so the next call looks again.
      v_out := v_out || jsonb_build_object('commands', coalesce((
        select jsonb_agg(to_jsonb(c) order by c.type_rank, c.priority desc, c.created_at, c.id)
          from public.relay_commands_slave c
         where c.id = any(v_state.last_command_ids) and c.status = 'processing'
           and c.locked_by = v_locker), '[]'::jsonb));
    elsif (v_cursor ->> 'commands')::bigint is distinct from v_state.commands_seq
          or v_state.commands_due_at <= now() then
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

comment on function public.sync_agent(jsonb, text[], integer, integer, integer, text) is
  'One call per edge agent per tick: commands locked for all its masters, rule changes, latch, configs, macros, and the next cursor; an idle call reads one row (decision 0021).';
revoke all on function public.sync_agent(jsonb, text[], integer, integer, integer, text) from public, anon;
grant execute on function public.sync_agent(jsonb, text[], integer, integer, integer, text) to authenticated, service_role;
-- The counters and triggers are the backend's own: nobody calls them.
revoke all on function private.bump_agent_sync(text[], boolean, boolean, boolean, boolean, boolean) from public;
revoke all on function private.sync_on_new_commands() from public;
revoke all on function private.sync_on_command_pending() from public;
revoke all on function private.sync_on_rule_change() from public;
revoke all on function private.sync_on_device_change() from public;
revoke all on function private.sync_on_macro_change() from public;
revoke all on function private.sync_on_macro_action_change() from public;
revoke all on function private.sync_on_latch_change() from public;
