-- Device discovery: an edge agent reports a master it heard announce itself but does not serve
-- yet. The row is created for the agent's owner, unassigned (agent_id null), so that it shows
-- in the dashboard to be adopted; nothing can be sent to it until someone assigns it and gives
-- the agent its key. The caller is taken from the JWT, never from the arguments.

create or replace function public.register_discovered_device(
  p_device_id text,
  p_firmware_version text default null,
  p_mac_address text default null
)
returns setof public.device_status
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_owner uuid := auth.uid();
  v_agent text := auth.jwt() ->> 'agent_id';
begin
  if private.caller_kind() is distinct from 'agent' or not private.can_access_agent(v_agent) then
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
  on conflict (device_id) do nothing;
  return query select d.* from public.device_status d
   where d.device_id = p_device_id and d.owner_id = v_owner;
end
$$;

revoke all on function public.register_discovered_device(text, text, text) from public, anon;
grant execute on function public.register_discovered_device(text, text, text) to authenticated, service_role;
