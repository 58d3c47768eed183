-- The trust boundary (issue "trust boundary", backend part):
--   1. a revoked agent's token reaches nothing: not the emergency stop, not the event log, not
--      any RPC, and PostgREST refuses it before each request;
--   2. register_discovered_device reveals nothing of a device the agent does not serve;
--   3. only the caller that serves a master locks its commands, and locked_by names that caller;
--   4. a command completed by a plain PATCH (the seed's markCommandCompleted) records the slave's
--      relay states like complete_slave_command does;
--   5. completed_at cannot be earlier than created_at;
--   6. a wrong insert into relay_commands_slave says what is wrong, by name, and another owner's
--      master looks exactly like a master that does not exist.
-- Row-level security stays the enforcement; the triggers below only make its refusals legible.

-- ---------------------------------------------------------------------------
-- 1. Caller identity: an agent token counts only while its agent is live
-- ---------------------------------------------------------------------------

-- An agent token whose agent does not exist, belongs to another owner or is revoked is nobody
-- (null), never a dashboard user: every policy and RPC that asks for a caller kind then refuses
-- it, including those that never look at a device (system_status, owner-scoped event_logs).
-- SECURITY DEFINER: edge_agents' own policy calls this, and must not recurse into it.
create or replace function private.caller_kind() returns text
language plpgsql stable security definer
set search_path = ''
as $$
declare
  v_uid uuid;
  v_agent text;
begin
  if auth.role() = 'service_role' then
    return 'service';
  end if;
  v_uid := auth.uid();
  if v_uid is null then
    return null;
  end if;
  v_agent := auth.jwt() ->> 'agent_id';
  if v_agent is not null then
    if exists (select 1 from public.edge_agents a
                where a.agent_id = v_agent and a.owner_id = v_uid and a.revoked_at is null) then
      return 'agent';
    end if;
    return null;
  end if;
  if auth.jwt() ->> 'device_id' is not null then
    return 'master';
  end if;
  return 'user';
end
$$;

-- caller_kind() = 'agent' now means a live agent of auth.uid() named by the token, so these no
-- longer look the agent up a second time.
create or replace function private.may_see_device(p_owner_id uuid, p_agent_id text, p_device_id text)
returns boolean
language plpgsql stable security definer
set search_path = ''
as $$
begin
  return case private.caller_kind()
    when 'service' then true
    when 'user' then p_owner_id = auth.uid()
    when 'agent' then p_owner_id = auth.uid() and p_agent_id = auth.jwt() ->> 'agent_id'
    when 'master' then p_owner_id = auth.uid() and p_device_id = auth.jwt() ->> 'device_id'
    else false
  end;
end
$$;

create or replace function private.can_access_agent(p_agent_id text) returns boolean
language sql stable security definer
set search_path = ''
as $$
  select case private.caller_kind()
    when 'service' then true
    when 'user' then exists (
      select 1 from public.edge_agents a where a.agent_id = p_agent_id and a.owner_id = auth.uid())
    when 'agent' then p_agent_id = auth.jwt() ->> 'agent_id'
    else false
  end
$$;

-- The policies that let an agent through on the owner alone.
alter policy event_logs_insert on public.event_logs
  with check (
    private.caller_kind() is not null
    and (owner_id is null or owner_id = auth.uid())
    and (device_id is null or private.can_access_device(device_id))
    and (agent_id is null or private.can_access_agent(agent_id))
  );
-- system_status needs no change: its policies ask for caller_kind() is not null, or in
-- ('user', 'agent'), and a dead agent is now null.

-- PostgREST calls this after switching to the request's role and before the request itself, so
-- a revoked agent gets one clear refusal (403) instead of a string of empty answers. The
-- policies hold without it. Its own schema: anon must reach it, and must not reach private;
-- PostgREST does not expose it.
create schema if not exists autocore_hooks;
revoke all on schema autocore_hooks from public;
grant usage on schema autocore_hooks to anon, authenticated, service_role;

create or replace function autocore_hooks.check_request() returns void
language plpgsql stable security definer
set search_path = ''
as $$
begin
  if auth.jwt() ->> 'agent_id' is not null and private.caller_kind() is distinct from 'agent'
     and private.caller_kind() is distinct from 'service' then
    raise exception 'edge_agent_refused: agent % is revoked or not an agent of this owner', auth.jwt() ->> 'agent_id'
      using errcode = 'insufficient_privilege',
            hint = 'a revoked agent needs a new agent_id and token from its owner';
  end if;
end
$$;

-- ---------------------------------------------------------------------------
-- 2. Discovery reveals nothing of a device the agent does not serve
-- ---------------------------------------------------------------------------

-- The return type changes (was the whole device_status row), so the function is replaced.
-- registered: whether this call created the device. A device id is unique across owners, so
-- whether an id is taken is not a secret (any insert learns it); nothing else is returned.
drop function public.register_discovered_device(text, text, text);
create function public.register_discovered_device(
  p_device_id text,
  p_firmware_version text default null,
  p_mac_address text default null
)
returns table (device_id text, registered boolean)
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_owner uuid := auth.uid();
  v_agent text := auth.jwt() ->> 'agent_id';
  v_rows integer;
begin
  if private.caller_kind() is distinct from 'agent' then
    return;
  end if;
  if p_device_id is null or p_device_id !~ '^[A-Za-z0-9_.:-]{1,64}$' then
    raise exception 'p_device_id must be 1-64 characters of A-Z a-z 0-9 _ . : -, got %', p_device_id
      using errcode = 'invalid_parameter_value';
  end if;
  if p_mac_address is not null and p_mac_address !~ '^[0-9A-F]{2}(:[0-9A-F]{2}){5}$' then
    raise exception 'p_mac_address must look like 24:6F:28:00:00:01, got %', p_mac_address
      using errcode = 'invalid_parameter_value';
  end if;
  -- A device that exists (this owner's or anyone's) is left as it is: discovery never takes a
  -- device over.
  insert into public.device_status (device_id, owner_id, agent_id, device_name, mac_address,
                                    firmware_version, is_online, last_seen)
  values (p_device_id, v_owner, null, 'discovered by ' || v_agent, p_mac_address,
          left(p_firmware_version, 64), true, now())
  on conflict on constraint device_status_pkey do nothing;
  get diagnostics v_rows = row_count;
  device_id := p_device_id;
  registered := v_rows > 0;
  return next;
end
$$;

comment on function public.register_discovered_device(text, text, text) is
  'For an edge agent: registers a master it heard but does not serve, for its owner, unassigned. Returns {device_id, registered} only.';
revoke all on function public.register_discovered_device(text, text, text) from public, anon;
grant execute on function public.register_discovered_device(text, text, text) to authenticated, service_role;

-- ---------------------------------------------------------------------------
-- 3. Who may lock a master's commands (docs/decisions/0007-who-may-lock-commands.md)
-- ---------------------------------------------------------------------------

-- Same hand-out as before. A caller that may not see the master still gets nothing (ADR 0003:
-- an unknown master and another owner's look alike). A caller that sees it locks only if it
-- serves it: the agent assigned to it, the master's own token, or, for a master no agent
-- serves, its owner; the owner's token on a master an agent serves is refused by name, since
-- locking there would take commands away from that agent.
create or replace function public.get_and_lock_slave_commands(
  p_master_device_id text,
  p_limit integer default 5,
  p_timeout_seconds integer default 30
)
returns setof public.relay_commands_slave
language plpgsql volatile security definer
set search_path = ''
set plan_cache_mode = force_generic_plan
as $$
declare
  v_owner uuid;
  v_agent text;
  v_locker text;
begin
  if p_limit is null or p_limit not between 1 and 100 then
    raise exception 'p_limit must be between 1 and 100, got %', p_limit using errcode = 'invalid_parameter_value';
  end if;
  if p_timeout_seconds is null or p_timeout_seconds not between 1 and 3600 then
    raise exception 'p_timeout_seconds must be between 1 and 3600, got %', p_timeout_seconds
      using errcode = 'invalid_parameter_value';
  end if;
  select d.owner_id, d.agent_id into v_owner, v_agent
    from public.device_status d
   where d.device_id = p_master_device_id;
  if not found or not coalesce(private.may_see_device(v_owner, v_agent, p_master_device_id), false) then
    return;
  end if;
  -- may_see_device already tied an agent to this master and a master token to itself.
  v_locker := case private.caller_kind()
    when 'agent' then 'agent:' || (auth.jwt() ->> 'agent_id')
    when 'master' then 'device:' || p_master_device_id
    when 'user' then case when v_agent is null then 'user:' || auth.uid()::text end
    when 'service' then 'service_role'
  end;
  if v_locker is null then
    raise exception 'command_lock_refused: % is served by an edge agent; only that agent or the master itself may lock its commands',
      p_master_device_id
      using errcode = 'insufficient_privilege',
            hint = 'to poll with the owner''s token, unassign the master (device_status.agent_id = null)';
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
           locked_by = v_locker,
           delivery_count = c.delivery_count + 1
      from picked
     where c.id = picked.id
    returning c.*
  )
  select * from locked l order by l.type_rank, l.priority desc, l.created_at, l.id;
end
$$;

-- ---------------------------------------------------------------------------
-- 4. Relay states are recorded however a command is completed
-- ---------------------------------------------------------------------------

-- A command that becomes completed by any UPDATE (the seed's PATCH, the agent's local API
-- mirror, a dashboard) applies its actions to its slave's relay_slaves row, creating the row
-- (8 relays, all off) if the slave is new, as complete_slave_command does when given no states.
-- The completion RPCs record the states themselves (reported states win, and the batch locks
-- slaves in a fixed order), so they set autocore.relay_states_by_rpc and this trigger stands
-- aside. SECURITY DEFINER: the caller already proved it may update the command, hence its master.
create or replace function private.record_completed_relay_states() returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  if current_setting('autocore.relay_states_by_rpc', true) is distinct from 'on' then
    perform private.record_relay_states(new, null);
  end if;
  return null;
end
$$;
revoke all on function private.record_completed_relay_states() from public;

create trigger relay_commands_slave_record_relay_states
  after update on public.relay_commands_slave
  for each row
  when (new.status = 'completed' and old.status is distinct from 'completed')
  execute function private.record_completed_relay_states();

alter function public.complete_slave_command(bigint, integer, boolean[]) set autocore.relay_states_by_rpc = 'on';
alter function public.complete_slave_commands(jsonb) set autocore.relay_states_by_rpc = 'on';

-- ---------------------------------------------------------------------------
-- 5. No completion before creation
-- ---------------------------------------------------------------------------

-- NOT VALID: rows written before this migration are not re-checked (they are final anyway);
-- every new or changed row is.
alter table public.relay_commands_slave
  add constraint relay_commands_slave_completed_after_created check (completed_at >= created_at) not valid;

-- ---------------------------------------------------------------------------
-- 6. A wrong new command is refused by name
-- ---------------------------------------------------------------------------

-- Runs before the insert policy, which alone would answer "violates row-level security policy"
-- for every one of these. A master the caller may not see, whether it does not exist or is
-- another owner's (or another agent's), gets the same answer. Only API callers are checked:
-- migrations, fixtures and service_role write as they please.
create or replace function private.check_new_relay_command() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if current_user <> 'authenticated' then
    return new;
  end if;
  if not private.can_access_device(new.master_device_id) then
    raise exception 'relay_commands_slave_unknown_master: unknown device %', new.master_device_id
      using errcode = 'insufficient_privilege';
  end if;
  if new.status not in ('pending', 'processing', 'sent', 'completed', 'failed', 'expired', 'cancelled') then
    raise exception 'relay_commands_slave_status_known: unknown status "%"; one of pending, processing, sent, completed, failed, expired, cancelled',
      new.status
      using errcode = 'check_violation';
  end if;
  if new.status <> 'pending' and private.caller_kind() is distinct from 'agent' then
    raise exception 'relay_commands_slave_new_is_pending: a new command is pending; only an edge agent reports one it already ran'
      using errcode = 'insufficient_privilege';
  end if;
  return new;
end
$$;
revoke all on function private.check_new_relay_command() from public;

create trigger relay_commands_slave_check_insert
  before insert on public.relay_commands_slave
  for each row execute function private.check_new_relay_command();

-- ---------------------------------------------------------------------------
-- Grants, and PostgREST's pre-request hook
-- ---------------------------------------------------------------------------

-- Functions are executable by PUBLIC when created; nothing in private is. The hook runs as
-- whichever role the request has, anon included. The functions replaced above keep their grants.
revoke all on all functions in schema private from public;
revoke all on function autocore_hooks.check_request() from public;
grant execute on function autocore_hooks.check_request() to anon, authenticated, service_role;

-- In-database configuration, read by PostgREST at start-up and on "reload config" (hosted
-- Supabase included). This replaces any db_pre_request set before.
alter role authenticator set pgrst.db_pre_request = 'autocore_hooks.check_request';
notify pgrst, 'reload config';
-- register_discovered_device changed its return type.
notify pgrst, 'reload schema';
