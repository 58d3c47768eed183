-- Telemetry retention and rollups in the cloud (decision 0013).
--
--   telemetry_rollup_1m, telemetry_rollup_1h  min, max, avg, last and count per device, sensor
--                                             and UTC minute or hour; what dashboards chart
--   retention_settings                        per owner: raw readings 7 days, events 30 days,
--                                             minute rollups 30 days, flight window 5 + 5 min
--   flight_recordings, flight_recorder_readings
--                                             the raw readings around each rule firing and each
--                                             emergency stop, kept as long as the firing or stop
--
-- private.telemetry_rollup_1m(), private.telemetry_rollup_1h() and private.telemetry_retention()
-- do the work, run by pg_cron; each is idempotent, serialised by one advisory lock, and safe to
-- run twice, late or by hand. Clients read the tables under the same rule as raw telemetry and
-- write none of them but their own retention_settings row.

-- ---------------------------------------------------------------------------
-- Rollups
-- ---------------------------------------------------------------------------

create table public.telemetry_rollup_1m (
  device_id text not null references public.device_status (device_id) on delete cascade,
  sensor_key text not null,
  -- The bucket's start, a whole UTC minute.
  bucket timestamptz not null,
  min_value double precision not null,
  max_value double precision not null,
  avg_value double precision not null,
  -- The value (and unit) of the bucket's latest reading.
  last_value double precision not null,
  unit text,
  sample_count integer not null,
  last_recorded_at timestamptz not null,
  -- When these figures last changed: a repeated run that finds nothing new leaves it alone.
  rolled_at timestamptz not null,
  primary key (device_id, sensor_key, bucket)
);
comment on table public.telemetry_rollup_1m is
  'Per device, sensor and UTC minute: min, max, avg, last and count of the raw readings. Kept rollup_1m_days (retention_settings).';

create table public.telemetry_rollup_1h (like public.telemetry_rollup_1m including all);
alter table public.telemetry_rollup_1h
  add foreign key (device_id) references public.device_status (device_id) on delete cascade;
comment on table public.telemetry_rollup_1h is
  'Per device, sensor and UTC hour: min, max, avg, last and count, from telemetry_rollup_1m. Kept for good; what a chart of days or weeks reads.';

-- The cloud's arrival time drives the rollups (a late reading is found by it), so API clients
-- may not set it: they insert the reading's own columns only (insert_telemetry does the same).
revoke insert on public.telemetry_data from authenticated;
grant insert (device_id, sensor_key, value, unit, recorded_at) on public.telemetry_data to authenticated;
create index telemetry_data_received_idx on public.telemetry_data (received_at);

-- ---------------------------------------------------------------------------
-- Per-owner retention
-- ---------------------------------------------------------------------------

create table public.retention_settings (
  owner_id uuid primary key default auth.uid() references auth.users (id) on delete cascade,
  raw_days integer not null default 7
    constraint retention_settings_raw_days_range check (raw_days between 1 and 3650),
  events_days integer not null default 30
    constraint retention_settings_events_days_range check (events_days between 1 and 3650),
  -- Never shorter in effect than raw_days: the hour rollups are recomputed from the minutes.
  rollup_1m_days integer not null default 30
    constraint retention_settings_rollup_1m_days_range check (rollup_1m_days between 1 and 3650),
  flight_before_seconds integer not null default 300
    constraint retention_settings_flight_before_range check (flight_before_seconds between 0 and 3600),
  flight_after_seconds integer not null default 300
    constraint retention_settings_flight_after_range check (flight_after_seconds between 0 and 3600),
  updated_at timestamptz not null default now()
);
comment on table public.retention_settings is
  'How long the cloud keeps an owner''s data; an owner without a row gets the defaults (7, 30, 30 days; 300 + 300 s).';

create trigger retention_settings_touch before update on public.retention_settings
  for each row execute function private.touch_updated_at();

-- Every owner's retention, defaults filled in: the one place the defaults are read.
create view private.owner_retention as
select u.id as owner_id,
       coalesce(s.raw_days, 7) as raw_days,
       coalesce(s.events_days, 30) as events_days,
       greatest(coalesce(s.rollup_1m_days, 30), coalesce(s.raw_days, 7)) as rollup_1m_days,
       coalesce(s.flight_before_seconds, 300) as flight_before_seconds,
       coalesce(s.flight_after_seconds, 300) as flight_after_seconds
  from auth.users u
  left join public.retention_settings s on s.owner_id = u.id;
revoke all on private.owner_retention from public, anon, authenticated;

-- ---------------------------------------------------------------------------
-- Flight recorder
-- ---------------------------------------------------------------------------

create table public.flight_recordings (
  id bigint generated always as identity primary key,
  owner_id uuid not null references auth.users (id) on delete cascade,
  anchor text not null
    constraint flight_recordings_anchor_known check (anchor in ('rule_firing', 'emergency_stop')),
  -- Deleted with its firing or stop (events retention), and its readings with it.
  rule_execution_id bigint constraint flight_recordings_one_per_firing unique
    references public.rule_executions (id) on delete cascade,
  event_log_id bigint constraint flight_recordings_one_per_stop unique
    references public.event_logs (id) on delete cascade,
  -- The firing's device; null for an emergency stop, which latches all of the owner's plant.
  device_id text references public.device_status (device_id) on delete cascade,
  anchor_at timestamptz not null,
  window_start timestamptz not null,
  window_end timestamptz not null,
  -- Every raw reading of the window has been copied (the window is older than the raw cutoff).
  complete boolean not null default false,
  created_at timestamptz not null default now(),
  constraint flight_recordings_one_anchor check (num_nonnulls(rule_execution_id, event_log_id) = 1),
  constraint flight_recordings_window_order check (window_start <= anchor_at and anchor_at <= window_end)
);
create index flight_recordings_owner_idx on public.flight_recordings (owner_id, anchor_at desc);
create index flight_recordings_device_idx on public.flight_recordings (device_id);
create index flight_recordings_open_idx on public.flight_recordings (id) where not complete;

create table public.flight_recorder_readings (
  recording_id bigint not null references public.flight_recordings (id) on delete cascade,
  device_id text not null references public.device_status (device_id) on delete cascade,
  sensor_key text not null,
  value double precision not null,
  unit text,
  recorded_at timestamptz not null,
  primary key (recording_id, device_id, sensor_key, recorded_at)
);
create index flight_recorder_readings_device_idx on public.flight_recorder_readings (device_id);
comment on table public.flight_recorder_readings is
  'Raw readings copied from telemetry_data around a flight recording''s anchor before raw retention deleted them.';

-- Emergency stops are found among the events by type.
create index event_logs_emergency_stop_idx on public.event_logs (occurred_at) where event_type = 'emergency_stop';

-- ---------------------------------------------------------------------------
-- Job state (private)
-- ---------------------------------------------------------------------------

-- Buckets to (re)compute: minutes touched by readings received since the watermark, and hours
-- whose minutes changed. A bucket still open stays here until it closes.
create table private.rollup_pending (
  level text not null constraint rollup_pending_level_known check (level in ('1m', '1h')),
  device_id text not null references public.device_status (device_id) on delete cascade,
  sensor_key text not null,
  bucket timestamptz not null,
  primary key (level, device_id, sensor_key, bucket)
);
create index rollup_pending_device_idx on private.rollup_pending (device_id);

-- Readings received at or after received_since have not all been seen by the minute rollup.
create table private.rollup_watermark (
  level text primary key constraint rollup_watermark_level_known check (level = '1m'),
  received_since timestamptz not null,
  last_run_at timestamptz
);
insert into private.rollup_watermark (level, received_since) values ('1m', '-infinity');

-- Raw readings of a device recorded before raw_deleted_before may be gone: a bucket older than
-- that is never recomputed from what is left (a late reading there would overwrite the figures).
create table private.telemetry_horizon (
  device_id text primary key references public.device_status (device_id) on delete cascade,
  raw_deleted_before timestamptz not null
);

revoke all on private.rollup_pending, private.rollup_watermark, private.telemetry_horizon
  from public, anon, authenticated;

-- ---------------------------------------------------------------------------
-- The jobs
-- ---------------------------------------------------------------------------

-- One lock for the three jobs: a run waits for the one before it, so their watermarks and
-- pending buckets are read and written in turn. Re-entrant within a transaction.
create or replace function private.lock_telemetry_jobs() returns void
language sql volatile
set search_path = ''
as $$
  select pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('autocore.telemetry_jobs')::bigint)
$$;

-- A float sum depends on the order rows are added in, which depends on the plan: the same
-- readings can give averages a few units in the last place apart. That is not a change (else a
-- second run would rewrite buckets, and queue their hours, for nothing).
create or replace function private.same_average(p_old double precision, p_new double precision)
returns boolean
language sql immutable
set search_path = ''
as $$
  select abs(p_old - p_new) <= 1e-9 * greatest(1.0, abs(p_old), abs(p_new))
$$;

-- Minute rollup: every closed minute that readings received since the watermark touched (late
-- ones included) is recomputed from raw and upserted; an unchanged bucket is not rewritten. The
-- hours those changes fall in are queued for the hour rollup. Returns what it did.
create or replace function private.telemetry_rollup_1m() returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_now timestamptz;
  v_close timestamptz;
  v_since timestamptz;
  v_next_since timestamptz;
  v_touched integer;
  v_changed integer;
  v_hours integer;
  v_closed integer;
begin
  perform private.lock_telemetry_jobs();
  v_now := clock_timestamp();
  v_close := date_trunc('minute', v_now, 'UTC');
  select w.received_since into v_since from private.rollup_watermark w where w.level = '1m' for update;

  -- received_at is its transaction's start (now()), and that transaction may commit after this
  -- run: the next run reads back to the start of the oldest client transaction open now, at
  -- least a minute and at most an hour back. Taken before the scan below, so a transaction
  -- that starts later is after it.
  select least(v_now - interval '1 minute', min(a.xact_start)) into v_next_since
    from pg_catalog.pg_stat_activity a
   where a.datname = pg_catalog.current_database()
     and a.backend_type = 'client backend'
     and a.pid <> pg_catalog.pg_backend_pid()
     and a.xact_start is not null;
  v_next_since := greatest(v_next_since, v_now - interval '1 hour');

  insert into private.rollup_pending (level, device_id, sensor_key, bucket)
  select distinct '1m', t.device_id, t.sensor_key, date_trunc('minute', t.recorded_at, 'UTC')
    from public.telemetry_data t
   where t.received_at >= v_since
  on conflict do nothing;
  get diagnostics v_touched = row_count;
  -- A catch-up (the first run, a missed hour) queues far more than the planner would guess
  -- from a table that is usually nearly empty.
  if v_touched > 10000 then
    analyze private.rollup_pending;
  end if;

  with closed as (
    select p.device_id, p.sensor_key, p.bucket
      from private.rollup_pending p
      left join private.telemetry_horizon h on h.device_id = p.device_id
     where p.level = '1m'
       and p.bucket < v_close
       and p.bucket >= coalesce(h.raw_deleted_before, '-infinity')
  ), fresh as (
    select t.device_id, t.sensor_key, c.bucket,
           min(t.value) as min_value, max(t.value) as max_value, avg(t.value) as avg_value,
           (array_agg(t.value order by t.recorded_at desc))[1] as last_value,
           (array_agg(t.unit order by t.recorded_at desc))[1] as unit,
           count(*)::integer as sample_count, max(t.recorded_at) as last_recorded_at
      from closed c
      join public.telemetry_data t
        on t.device_id = c.device_id and t.sensor_key = c.sensor_key
       and t.recorded_at >= c.bucket and t.recorded_at < c.bucket + interval '1 minute'
       -- Redundant with the range, but hashable: a large catch-up joins by hash, not by
       -- matching every reading of a sensor against every queued minute.
       and date_trunc('minute', t.recorded_at, 'UTC') = c.bucket
     group by t.device_id, t.sensor_key, c.bucket
  ), changed as (
    insert into public.telemetry_rollup_1m as r
      (device_id, sensor_key, bucket, min_value, max_value, avg_value, last_value, unit,
       sample_count, last_recorded_at, rolled_at)
    select f.device_id, f.sensor_key, f.bucket, f.min_value, f.max_value, f.avg_value, f.last_value,
           f.unit, f.sample_count, f.last_recorded_at, v_now
      from fresh f
    on conflict (device_id, sensor_key, bucket) do update
      set min_value = excluded.min_value, max_value = excluded.max_value,
          avg_value = excluded.avg_value, last_value = excluded.last_value, unit = excluded.unit,
          sample_count = excluded.sample_count, last_recorded_at = excluded.last_recorded_at,
          rolled_at = excluded.rolled_at
      where (r.min_value, r.max_value, r.last_value, r.unit, r.sample_count, r.last_recorded_at)
            is distinct from
            (excluded.min_value, excluded.max_value, excluded.last_value,
             excluded.unit, excluded.sample_count, excluded.last_recorded_at)
         or not private.same_average(r.avg_value, excluded.avg_value)
    returning r.device_id, r.sensor_key, r.bucket
  ), hours as (
    insert into private.rollup_pending (level, device_id, sensor_key, bucket)
    select distinct '1h', c.device_id, c.sensor_key, date_trunc('hour', c.bucket, 'UTC')
      from changed c
    on conflict do nothing
    returning 1
  )
  select (select count(*) from changed), (select count(*) from hours) into v_changed, v_hours;
  if v_hours > 1000 then
    analyze private.rollup_pending;
  end if;

  -- Closed minutes are done, those behind the horizon included (nothing left to roll them from).
  delete from private.rollup_pending p where p.level = '1m' and p.bucket < v_close;
  get diagnostics v_closed = row_count;
  -- And after one, the next run must not plan for a queue that is gone.
  if v_closed > 10000 then
    analyze private.rollup_pending;
  end if;

  update private.rollup_watermark w
     set received_since = greatest(v_next_since, v_since), last_run_at = v_now
   where w.level = '1m';

  return jsonb_build_object(
    'buckets_touched', v_touched, 'buckets_closed', v_closed, 'minutes_changed', v_changed,
    'hours_queued', v_hours, 'received_since', v_since,
    'next_received_since', greatest(v_next_since, v_since),
    'ms', round(extract(epoch from clock_timestamp() - v_now) * 1000, 1));
end
$$;

-- Hour rollup: every closed hour queued by the minute rollup, recomputed from its minutes.
create or replace function private.telemetry_rollup_1h() returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_now timestamptz;
  v_close timestamptz;
  v_changed integer;
  v_closed integer;
begin
  perform private.lock_telemetry_jobs();
  v_now := clock_timestamp();
  v_close := date_trunc('hour', v_now, 'UTC');

  with closed as (
    select p.device_id, p.sensor_key, p.bucket
      from private.rollup_pending p
      left join private.telemetry_horizon h on h.device_id = p.device_id
     where p.level = '1h'
       and p.bucket < v_close
       and p.bucket >= coalesce(h.raw_deleted_before, '-infinity')
  ), fresh as (
    select m.device_id, m.sensor_key, c.bucket,
           min(m.min_value) as min_value, max(m.max_value) as max_value,
           sum(m.avg_value * m.sample_count) / sum(m.sample_count) as avg_value,
           (array_agg(m.last_value order by m.last_recorded_at desc))[1] as last_value,
           (array_agg(m.unit order by m.last_recorded_at desc))[1] as unit,
           sum(m.sample_count)::integer as sample_count, max(m.last_recorded_at) as last_recorded_at
      from closed c
      join public.telemetry_rollup_1m m
        on m.device_id = c.device_id and m.sensor_key = c.sensor_key
       and m.bucket >= c.bucket and m.bucket < c.bucket + interval '1 hour'
       and date_trunc('hour', m.bucket, 'UTC') = c.bucket
     group by m.device_id, m.sensor_key, c.bucket
  )
  insert into public.telemetry_rollup_1h as r
    (device_id, sensor_key, bucket, min_value, max_value, avg_value, last_value, unit,
     sample_count, last_recorded_at, rolled_at)
  select f.device_id, f.sensor_key, f.bucket, f.min_value, f.max_value, f.avg_value, f.last_value,
         f.unit, f.sample_count, f.last_recorded_at, v_now
    from fresh f
  on conflict (device_id, sensor_key, bucket) do update
    set min_value = excluded.min_value, max_value = excluded.max_value,
        avg_value = excluded.avg_value, last_value = excluded.last_value, unit = excluded.unit,
        sample_count = excluded.sample_count, last_recorded_at = excluded.last_recorded_at,
        rolled_at = excluded.rolled_at
    where (r.min_value, r.max_value, r.last_value, r.unit, r.sample_count, r.last_recorded_at)
          is distinct from
          (excluded.min_value, excluded.max_value, excluded.last_value,
           excluded.unit, excluded.sample_count, excluded.last_recorded_at)
       or not private.same_average(r.avg_value, excluded.avg_value);
  get diagnostics v_changed = row_count;

  delete from private.rollup_pending p where p.level = '1h' and p.bucket < v_close;
  get diagnostics v_closed = row_count;
  if v_closed > 1000 then
    analyze private.rollup_pending;
  end if;

  return jsonb_build_object('buckets_closed', v_closed, 'hours_changed', v_changed,
    'ms', round(extract(epoch from clock_timestamp() - v_now) * 1000, 1));
end
$$;

-- Retention, per owner: first the rollups (nothing is deleted before it is rolled up), then the
-- flight recorder (the raw readings around each rule firing and emergency stop whose window
-- reaches past the raw cutoff are copied), then raw readings older than raw_days, minute
-- rollups older than rollup_1m_days, events and rule firings older than events_days (their
-- flight recordings go with them). Idempotent: a second run finds nothing to do.
create or replace function private.telemetry_retention() returns jsonb
language plpgsql volatile security definer
set search_path = ''
as $$
declare
  v_now timestamptz;
  v_rollup_1m jsonb;
  v_rollup_1h jsonb;
  v_recordings integer;
  v_stops integer;
  v_copied integer;
  v_completed integer;
  v_raw integer;
  v_minutes integer;
  v_events integer;
  v_firings integer;
  v_n integer;
  v_cut record;
begin
  perform private.lock_telemetry_jobs();
  v_rollup_1m := private.telemetry_rollup_1m();
  v_rollup_1h := private.telemetry_rollup_1h();
  v_now := clock_timestamp();

  -- Flight recordings for firings and stops that are kept, whose window reaches raw readings
  -- this run deletes.
  insert into public.flight_recordings
    (owner_id, anchor, rule_execution_id, device_id, anchor_at, window_start, window_end)
  select d.owner_id, 'rule_firing', r.id, r.device_id, r.executed_at,
         r.executed_at - make_interval(secs => o.flight_before_seconds),
         r.executed_at + make_interval(secs => o.flight_after_seconds)
    from public.rule_executions r
    join public.device_status d on d.device_id = r.device_id
    join private.owner_retention o on o.owner_id = d.owner_id
   where r.executed_at - make_interval(secs => o.flight_before_seconds) < v_now - make_interval(days => o.raw_days)
     and r.executed_at >= v_now - make_interval(days => o.events_days)
  on conflict do nothing;
  get diagnostics v_recordings = row_count;

  insert into public.flight_recordings
    (owner_id, anchor, event_log_id, anchor_at, window_start, window_end)
  select o.owner_id, 'emergency_stop', s.id, s.occurred_at,
         s.occurred_at - make_interval(secs => o.flight_before_seconds),
         s.occurred_at + make_interval(secs => o.flight_after_seconds)
    from (select e.id, e.occurred_at,
                 coalesce(e.owner_id,
                          (select a.owner_id from public.edge_agents a where a.agent_id = e.agent_id),
                          (select d.owner_id from public.device_status d where d.device_id = e.device_id)) as owner_id
            from public.event_logs e
           where e.event_type = 'emergency_stop') s
    join private.owner_retention o on o.owner_id = s.owner_id
   where s.occurred_at - make_interval(secs => o.flight_before_seconds) < v_now - make_interval(days => o.raw_days)
     and s.occurred_at >= v_now - make_interval(days => o.events_days)
  on conflict do nothing;
  get diagnostics v_stops = row_count;

  -- Copy (again, harmlessly) every recording not yet complete; a window that straddles the
  -- cutoff is copied whole now and completed by a later run.
  insert into public.flight_recorder_readings (recording_id, device_id, sensor_key, value, unit, recorded_at)
  select f.id, t.device_id, t.sensor_key, t.value, t.unit, t.recorded_at
    from public.flight_recordings f
    join public.device_status d
      on d.owner_id = f.owner_id and (f.device_id is null or d.device_id = f.device_id)
    -- Lateral: one index range scan per device and window, never a scan of the table.
    cross join lateral (
      select r.device_id, r.sensor_key, r.value, r.unit, r.recorded_at
        from public.telemetry_data r
       where r.device_id = d.device_id
         and r.recorded_at >= f.window_start and r.recorded_at <= f.window_end
    ) t
   where not f.complete
  on conflict do nothing;
  get diagnostics v_copied = row_count;

  update public.flight_recordings f
     set complete = true
    from private.owner_retention o
   where o.owner_id = f.owner_id and not f.complete
     and f.window_end < v_now - make_interval(days => o.raw_days);
  get diagnostics v_completed = row_count;

  -- Raw readings and minute rollups, device by device, each cutoff a constant of its statement:
  -- an index range scan on (device_id, recorded_at), where one statement joining every
  -- device's cutoff was planned as a scan of the whole table.
  v_raw := 0;
  v_minutes := 0;
  for v_cut in
    select d.device_id,
           v_now - make_interval(days => o.raw_days) as raw_before,
           v_now - make_interval(days => o.rollup_1m_days) as minutes_before
      from public.device_status d
      join private.owner_retention o on o.owner_id = d.owner_id
  loop
    execute 'delete from public.telemetry_data where device_id = $1 and recorded_at < $2'
      using v_cut.device_id, v_cut.raw_before;
    get diagnostics v_n = row_count;
    v_raw := v_raw + v_n;
    insert into private.telemetry_horizon as h (device_id, raw_deleted_before)
    values (v_cut.device_id, v_cut.raw_before)
    on conflict (device_id) do update
      set raw_deleted_before = greatest(h.raw_deleted_before, excluded.raw_deleted_before);
    execute 'delete from public.telemetry_rollup_1m where device_id = $1 and bucket < $2'
      using v_cut.device_id, v_cut.minutes_before;
    get diagnostics v_n = row_count;
    v_minutes := v_minutes + v_n;
  end loop;

  delete from public.rule_executions r
   using public.device_status d, private.owner_retention o
   where r.device_id = d.device_id and o.owner_id = d.owner_id
     and r.executed_at < v_now - make_interval(days => o.events_days);
  get diagnostics v_firings = row_count;

  -- No owner keeps events for less than a day, so younger ones are not even looked at.
  delete from public.event_logs e
   using private.owner_retention o
   where e.occurred_at < v_now - interval '1 day'
     and o.owner_id = coalesce(e.owner_id,
                               (select a.owner_id from public.edge_agents a where a.agent_id = e.agent_id),
                               (select d.owner_id from public.device_status d where d.device_id = e.device_id))
     and e.occurred_at < v_now - make_interval(days => o.events_days);
  get diagnostics v_events = row_count;

  return jsonb_build_object(
    'rollup_1m', v_rollup_1m, 'rollup_1h', v_rollup_1h,
    'flight_recordings_created', v_recordings + v_stops, 'flight_readings_copied', v_copied,
    'flight_recordings_completed', v_completed,
    'raw_deleted', v_raw, 'rollup_1m_deleted', v_minutes,
    'rule_executions_deleted', v_firings, 'events_deleted', v_events,
    'ms', round(extract(epoch from clock_timestamp() - v_now) * 1000, 1));
end
$$;

-- Jobs, not API: neither anon nor authenticated may run them (PostgREST does not expose private
-- either); service_role may, to run one by hand.
revoke all on function private.lock_telemetry_jobs() from public, anon, authenticated;
revoke all on function private.same_average(double precision, double precision) from public, anon, authenticated;
revoke all on function private.telemetry_rollup_1m() from public, anon, authenticated;
revoke all on function private.telemetry_rollup_1h() from public, anon, authenticated;
revoke all on function private.telemetry_retention() from public, anon, authenticated;
grant execute on function private.lock_telemetry_jobs(), private.telemetry_rollup_1m(),
  private.telemetry_rollup_1h(), private.telemetry_retention() to service_role;

-- ---------------------------------------------------------------------------
-- Access: read like raw telemetry, write nothing but one's own retention settings
-- ---------------------------------------------------------------------------

alter table public.telemetry_rollup_1m enable row level security;
alter table public.telemetry_rollup_1h enable row level security;
alter table public.retention_settings enable row level security;
alter table public.flight_recordings enable row level security;
alter table public.flight_recorder_readings enable row level security;

-- Supabase's default privileges give the API roles everything on a new table; narrow them.
revoke all on public.telemetry_rollup_1m, public.telemetry_rollup_1h, public.retention_settings,
  public.flight_recordings, public.flight_recorder_readings from anon, authenticated;
grant select on public.telemetry_rollup_1m, public.telemetry_rollup_1h,
  public.flight_recordings, public.flight_recorder_readings to authenticated;
grant select, insert, update on public.retention_settings to authenticated;
grant all on public.telemetry_rollup_1m, public.telemetry_rollup_1h, public.retention_settings,
  public.flight_recordings, public.flight_recorder_readings to service_role;

create policy telemetry_rollup_1m_select on public.telemetry_rollup_1m for select to authenticated
  using (private.can_access_device(device_id));
create policy telemetry_rollup_1h_select on public.telemetry_rollup_1h for select to authenticated
  using (private.can_access_device(device_id));

create policy retention_settings_select on public.retention_settings for select to authenticated
  using (private.caller_kind() = 'user' and owner_id = auth.uid());
create policy retention_settings_insert on public.retention_settings for insert to authenticated
  with check (private.caller_kind() = 'user' and owner_id = auth.uid());
create policy retention_settings_update on public.retention_settings for update to authenticated
  using (private.caller_kind() = 'user' and owner_id = auth.uid())
  with check (private.caller_kind() = 'user' and owner_id = auth.uid());

create policy flight_recordings_select on public.flight_recordings for select to authenticated
  using (
    case when device_id is not null then private.can_access_device(device_id)
         else private.caller_kind() = 'user' and owner_id = auth.uid()
    end
  );
create policy flight_recorder_readings_select on public.flight_recorder_readings for select to authenticated
  using (private.can_access_device(device_id));

-- ---------------------------------------------------------------------------
-- Schedule (pg_cron), where the server has it
-- ---------------------------------------------------------------------------

-- Hosted Supabase has pg_cron (enabled here if it is not yet); the local stack preloads it. A
-- server without it still gets everything above, and the jobs can be run by hand.
do $$
begin
  if not exists (select 1 from pg_extension where extname = 'pg_cron') then
    begin
      create extension if not exists pg_cron with schema pg_catalog;
    exception when others then
      raise notice 'pg_cron is not available here (%); the telemetry jobs are not scheduled', sqlerrm;
    end;
  end if;
end
$$;

-- Rescheduled by name, so that applying this again leaves one job of each.
do $$
declare
  v_job record;
begin
  if to_regnamespace('cron') is null then
    return;
  end if;
  for v_job in
    select j.jobid from cron.job j
     where j.jobname in ('autocore-telemetry-rollup-1m', 'autocore-telemetry-rollup-1h',
                         'autocore-telemetry-retention')
  loop
    perform cron.unschedule(v_job.jobid);
  end loop;
  perform cron.schedule('autocore-telemetry-rollup-1m', '* * * * *',
                        'select private.telemetry_rollup_1m()');
  perform cron.schedule('autocore-telemetry-rollup-1h', '3 * * * *',
                        'select private.telemetry_rollup_1h()');
  perform cron.schedule('autocore-telemetry-retention', '17 3 * * *',
                        'select private.telemetry_retention()');
end
$$;
