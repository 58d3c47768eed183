-- Not part of the backend: a proposal, measured with
--   AUTOCORE_BENCH_EXTRA_SQL=sql/bench/try_plpgsql_access_helpers.sql cargo run --release -p autocore-stack --bin bench-backend
-- private.caller_kind, may_see_device and can_access_device of migration 20261122000200 with
-- the same logic in plpgsql, whose plans are kept per session; as SQL functions with SET
-- search_path they cannot be inlined and are parsed and planned again on every call.
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
  select d.owner_id, d.agent_id into v_owner, v_agent from public.device_status d where d.device_id = p_device_id;
  if not found then
    return false;
  end if;
  return coalesce(private.may_see_device(v_owner, v_agent, p_device_id), false);
end
$$;
