-- Bulk telemetry for agents and masters: one access check per device in the batch instead of
-- the insert policy's check per row (at 864,000 rows, the per-row policy dominated the time a
-- backlog takes to drain; see BENCHMARKS.md). A reading already stored (same device, sensor and
-- time) is skipped, so a retried batch never duplicates.

create or replace function public.insert_telemetry(p_readings jsonb)
returns integer
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_count integer;
  v_device text;
  v_inserted integer;
begin
  if jsonb_typeof(p_readings) is distinct from 'array' then
    raise exception 'p_readings must be a JSON array of readings' using errcode = 'invalid_parameter_value';
  end if;
  v_count := jsonb_array_length(p_readings);
  if v_count > 5000 then
    raise exception 'p_readings may hold at most 5000 readings, got %', v_count
      using errcode = 'invalid_parameter_value';
  end if;
  if private.caller_kind() is distinct from 'agent' and private.caller_kind() is distinct from 'master'
     and private.caller_kind() is distinct from 'service' then
    raise exception 'only an agent or a master pushes telemetry' using errcode = 'insufficient_privilege';
  end if;
  for v_device in select distinct r ->> 'device_id' from jsonb_array_elements(p_readings) r loop
    if v_device is null or not private.can_access_device(v_device) then
      raise exception 'no access to device %', coalesce(v_device, '(none)') using errcode = 'insufficient_privilege';
    end if;
  end loop;
  insert into public.telemetry_data (device_id, sensor_key, value, unit, recorded_at)
  select r.device_id, r.sensor_key, r.value, r.unit, r.recorded_at
    from jsonb_to_recordset(p_readings) as r(device_id text, sensor_key text, value double precision,
                                             unit text, recorded_at timestamptz)
  on conflict (device_id, sensor_key, recorded_at) do nothing;
  get diagnostics v_inserted = row_count;
  return v_inserted;
end
$$;

revoke all on function public.insert_telemetry(jsonb) from public, anon;
grant execute on function public.insert_telemetry(jsonb) to authenticated, service_role;
