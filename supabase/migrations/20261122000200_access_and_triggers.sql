-- Who may see and change what (row-level security on every table), and the triggers that keep
-- commands and rules honest whoever writes them.
--
-- Callers, told apart by their JWT claims (all carry role=authenticated and sub = the owner):
--   dashboard user  sub only                    -> every device the user owns
--   edge agent      sub + agent_id              -> only the masters assigned to that agent
--   ESP32 master    sub + device_id             -> only itself
-- anon sees nothing; service_role bypasses RLS and never lives on a Pi.

-- ---------------------------------------------------------------------------
-- Caller identity
-- ---------------------------------------------------------------------------

-- The helpers below are plpgsql, not SQL: a SQL function with SET search_path cannot be inlined
-- and is parsed and planned again on every call, while plpgsql keeps its plans for the session.
-- They run once per row a policy checks and once per RPC call (see BENCHMARKS.md).
create or replace function private.caller_kind() returns text
language plpgsql stable
set search_path = ''
as $$
begin
  return case
    when auth.role() = 'service_role' then 'service'
    when auth.uid() is null then null
    when auth.jwt() ->> 'agent_id' is not null then 'agent'
    when auth.jwt() ->> 'device_id' is not null then 'master'
    else 'user'
  end;
end
$$;

-- Whether the caller may see a device with these owner, agent and id columns. Takes the columns
-- rather than the id so that policies on device_status itself need no second lookup.
create or replace function private.may_see_device(p_owner_id uuid, p_agent_id text, p_device_id text)
returns boolean
language plpgsql stable security definer
set search_path = ''
as $$
begin
  return case private.caller_kind()
    when 'service' then true
    when 'user' then p_owner_id = auth.uid()
    when 'agent' then
      p_owner_id = auth.uid()
      and p_agent_id = auth.jwt() ->> 'agent_id'
      and exists (
        select 1 from public.edge_agents a
        where a.agent_id = p_agent_id and a.owner_id = p_owner_id and a.revoked_at is null
      )
    when 'master' then p_owner_id = auth.uid() and p_device_id = auth.jwt() ->> 'device_id'
    else false
  end;
end
$$;

create or replace function private.can_access_device(p_device_id text) returns boolean
language plpgsql stable security definer
set search_path = ''
as $$
declare
  v_owner uuid;
  v_agent text;
begin
  select d.owner_id, d.agent_id into v_owner, v_agent
    from public.device_status d
   where d.device_id = p_device_id;
  if not found then
    return false;
  end if;
  return coalesce(private.may_see_device(v_owner, v_agent, p_device_id), false);
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
    when 'agent' then p_agent_id = auth.jwt() ->> 'agent_id' and exists (
      select 1 from public.edge_agents a
      where a.agent_id = p_agent_id and a.owner_id = auth.uid() and a.revoked_at is null)
    else false
  end
$$;

create or replace function private.can_access_macro(p_macro_id uuid) returns boolean
language sql stable security definer
set search_path = ''
as $$
  select coalesce((
    select case private.caller_kind()
      when 'service' then true
      when 'user' then m.owner_id = auth.uid()
      when 'agent' then m.owner_id = auth.uid() and private.can_access_agent(m.agent_id)
      else false
    end
    from public.macros m where m.id = p_macro_id
  ), false)
$$;

-- An agent may only name itself, and a device may only be assigned to an agent of its owner.
create or replace function private.agent_fits_owner(p_agent_id text, p_owner_id uuid) returns boolean
language sql stable security definer
set search_path = ''
as $$
  select p_agent_id is null or exists (
    select 1 from public.edge_agents a where a.agent_id = p_agent_id and a.owner_id = p_owner_id)
$$;

revoke all on all functions in schema private from public;
grant usage on schema private to authenticated, service_role;
grant execute on all functions in schema private to authenticated, service_role;

-- ---------------------------------------------------------------------------
-- Triggers
-- ---------------------------------------------------------------------------

create or replace function private.touch_updated_at() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.updated_at := now();
  return new;
end
$$;

create trigger device_status_touch before update on public.device_status
  for each row execute function private.touch_updated_at();
create trigger relay_slaves_touch before update on public.relay_slaves
  for each row execute function private.touch_updated_at();
create trigger system_status_touch before update on public.system_status
  for each row execute function private.touch_updated_at();

-- Commands: content is immutable once written, terminal states are final, and nothing is handed
-- out after its expiry.
create or replace function private.guard_relay_command() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if (new.master_device_id, new.slave_mac_address, new.relay_numbers, new.actions,
      new.duration_seconds, new.command_type, new.client_id, new.created_at, new.expires_at)
     is distinct from
     (old.master_device_id, old.slave_mac_address, old.relay_numbers, old.actions,
      old.duration_seconds, old.command_type, old.client_id, old.created_at, old.expires_at) then
    raise exception 'relay_commands_slave_immutable_content: command % cannot be edited; cancel it and send a new one', old.id
      using errcode = 'check_violation';
  end if;
  if old.status in ('completed', 'failed', 'expired', 'cancelled') and new.status is distinct from old.status then
    raise exception 'relay_commands_slave_terminal_status: command % is already %', old.id, old.status
      using errcode = 'check_violation';
  end if;
  if new.status in ('processing', 'sent') and new.status is distinct from old.status and now() >= new.expires_at then
    raise exception 'relay_commands_slave_expired: command % expired at %', old.id, old.expires_at
      using errcode = 'check_violation';
  end if;
  if new.status in ('completed', 'failed') and new.completed_at is null then
    new.completed_at := now();
  end if;
  new.updated_at := now();
  return new;
end
$$;

create trigger relay_commands_slave_guard before update on public.relay_commands_slave
  for each row execute function private.guard_relay_command();

-- Rules: every change bumps the revision; a deletion leaves a tombstone for mirrors.
create or replace function private.bump_rule_revision() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.revision := old.revision + 1;
  new.updated_at := now();
  new.created_at := old.created_at;
  return new;
end
$$;

create trigger decision_rules_revision before update on public.decision_rules
  for each row execute function private.bump_rule_revision();

create or replace function private.record_rule_tombstone() returns trigger
language plpgsql security definer
set search_path = ''
as $$
begin
  insert into public.decision_rule_tombstones (id, device_id, rule_id, revision, deleted_at)
  values (old.id, old.device_id, old.rule_id, old.revision + 1, now())
  on conflict (id) do update
    set revision = excluded.revision, deleted_at = excluded.deleted_at;
  return old;
end
$$;

create trigger decision_rules_tombstone after delete on public.decision_rules
  for each row execute function private.record_rule_tombstone();

create or replace function private.bump_macro_revision() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.revision := old.revision + 1;
  new.updated_at := now();
  return new;
end
$$;

create trigger macros_revision before update on public.macros
  for each row execute function private.bump_macro_revision();

-- ---------------------------------------------------------------------------
-- Grants: anon gets nothing at all; authenticated is narrowed by the policies below.
-- ---------------------------------------------------------------------------

revoke all on all tables in schema public from anon;
revoke all on all sequences in schema public from anon;
grant select, insert, update, delete on all tables in schema public to authenticated;
grant usage, select on all sequences in schema public to authenticated;
grant all on all tables in schema public to service_role;
grant all on all sequences in schema public to service_role;

-- ---------------------------------------------------------------------------
-- Row-level security
-- ---------------------------------------------------------------------------

alter table public.edge_agents enable row level security;
alter table public.device_status enable row level security;
alter table public.relay_slaves enable row level security;
alter table public.relay_commands_slave enable row level security;
alter table public.decision_rules enable row level security;
alter table public.decision_rule_tombstones enable row level security;
alter table public.telemetry_data enable row level security;
alter table public.event_logs enable row level security;
alter table public.system_status enable row level security;
alter table public.macros enable row level security;
alter table public.macro_actions enable row level security;

-- edge_agents: users manage their own agents; an agent reads its own row.
-- On the row's own columns, not through can_access_agent: a row being inserted with
-- return=representation is not yet visible to a lookup.
create policy edge_agents_select on public.edge_agents for select to authenticated
  using (
    case private.caller_kind()
      when 'service' then true
      when 'user' then owner_id = auth.uid()
      when 'agent' then agent_id = auth.jwt() ->> 'agent_id' and owner_id = auth.uid() and revoked_at is null
      else false
    end
  );
create policy edge_agents_insert on public.edge_agents for insert to authenticated
  with check (private.caller_kind() = 'user' and owner_id = auth.uid());
create policy edge_agents_update on public.edge_agents for update to authenticated
  using (private.caller_kind() = 'user' and owner_id = auth.uid())
  with check (owner_id = auth.uid());
create policy edge_agents_delete on public.edge_agents for delete to authenticated
  using (private.caller_kind() = 'user' and owner_id = auth.uid());

-- device_status: an agent registers the masters it discovers, for its owner and itself.
create policy device_status_select on public.device_status for select to authenticated
  using (private.may_see_device(owner_id, agent_id, device_id));
create policy device_status_insert on public.device_status for insert to authenticated
  with check (
    private.caller_kind() in ('user', 'agent')
    and private.may_see_device(owner_id, agent_id, device_id)
    and private.agent_fits_owner(agent_id, owner_id)
  );
create policy device_status_update on public.device_status for update to authenticated
  using (private.may_see_device(owner_id, agent_id, device_id))
  with check (
    private.may_see_device(owner_id, agent_id, device_id)
    and private.agent_fits_owner(agent_id, owner_id)
  );
create policy device_status_delete on public.device_status for delete to authenticated
  using (private.caller_kind() = 'user' and owner_id = auth.uid());

-- relay_slaves: whoever may see the master.
create policy relay_slaves_all on public.relay_slaves for all to authenticated
  using (private.can_access_device(master_device_id))
  with check (private.can_access_device(master_device_id));

-- relay_commands_slave: people and masters create pending commands; an agent also reports
-- commands its rules already ran (status completed). Deletion is for people only.
create policy relay_commands_slave_select on public.relay_commands_slave for select to authenticated
  using (private.can_access_device(master_device_id));
create policy relay_commands_slave_insert on public.relay_commands_slave for insert to authenticated
  with check (
    private.can_access_device(master_device_id)
    and (status = 'pending' or private.caller_kind() = 'agent')
  );
create policy relay_commands_slave_update on public.relay_commands_slave for update to authenticated
  using (private.can_access_device(master_device_id))
  with check (private.can_access_device(master_device_id));
create policy relay_commands_slave_delete on public.relay_commands_slave for delete to authenticated
  using (private.caller_kind() = 'user' and private.can_access_device(master_device_id));

-- decision_rules: people author; agents write back last_error; masters only read.
create policy decision_rules_select on public.decision_rules for select to authenticated
  using (private.can_access_device(device_id));
create policy decision_rules_insert on public.decision_rules for insert to authenticated
  with check (private.caller_kind() = 'user' and private.can_access_device(device_id));
create policy decision_rules_update on public.decision_rules for update to authenticated
  using (private.caller_kind() in ('user', 'agent') and private.can_access_device(device_id))
  with check (private.can_access_device(device_id));
create policy decision_rules_delete on public.decision_rules for delete to authenticated
  using (private.caller_kind() = 'user' and private.can_access_device(device_id));

create policy decision_rule_tombstones_select on public.decision_rule_tombstones for select to authenticated
  using (private.can_access_device(device_id));

-- telemetry_data: written by agents and masters, read by whoever sees the device.
create policy telemetry_data_select on public.telemetry_data for select to authenticated
  using (private.can_access_device(device_id));
create policy telemetry_data_insert on public.telemetry_data for insert to authenticated
  with check (private.caller_kind() in ('agent', 'master') and private.can_access_device(device_id));

-- event_logs: scoped by device, else by agent, else by owner.
create policy event_logs_select on public.event_logs for select to authenticated
  using (
    case
      when device_id is not null then private.can_access_device(device_id)
      when agent_id is not null then private.can_access_agent(agent_id)
      else private.caller_kind() = 'user' and owner_id = auth.uid()
    end
  );
create policy event_logs_insert on public.event_logs for insert to authenticated
  with check (
    (owner_id is null or owner_id = auth.uid())
    and (device_id is null or private.can_access_device(device_id))
    and (agent_id is null or private.can_access_agent(agent_id))
  );

-- system_status: everyone of the owner reads the latch; people and agents set and reset it.
create policy system_status_select on public.system_status for select to authenticated
  using (owner_id = auth.uid() and private.caller_kind() is not null);
create policy system_status_insert on public.system_status for insert to authenticated
  with check (owner_id = auth.uid() and private.caller_kind() in ('user', 'agent'));
create policy system_status_update on public.system_status for update to authenticated
  using (owner_id = auth.uid() and private.caller_kind() in ('user', 'agent'))
  with check (owner_id = auth.uid());

-- macros: people author; the agent that runs a macro reads it.
create policy macros_select on public.macros for select to authenticated
  using (private.can_access_macro(id));
create policy macros_write on public.macros for all to authenticated
  using (private.caller_kind() = 'user' and owner_id = auth.uid())
  with check (
    private.caller_kind() = 'user' and owner_id = auth.uid()
    and private.agent_fits_owner(agent_id, owner_id)
  );
create policy macro_actions_select on public.macro_actions for select to authenticated
  using (private.can_access_macro(macro_id));
create policy macro_actions_write on public.macro_actions for all to authenticated
  using (private.caller_kind() = 'user' and private.can_access_macro(macro_id))
  with check (private.caller_kind() = 'user' and private.can_access_macro(macro_id));
