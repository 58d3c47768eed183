-- A lost answer of get_and_lock_slave_commands costs nothing (issue 11, point 7). The agent
-- names each lock call with a request id and repeats it when the call fails without an answer
-- (a PostgREST freeze, a timeout); a repeated id hands out the rows that call locked, as they
-- are now, instead of leaving them locked in the cloud until the lock timeout. Callers that send
-- no request id (masters polling, the seeds' firmware) are served as before.
-- Runs unchanged on hosted Supabase; every statement can run twice.

create table if not exists private.command_lock_requests (
  locker text not null,
  request_id text not null,
  master_device_id text not null,
  command_ids bigint[] not null,
  created_at timestamptz not null default now(),
  primary key (locker, request_id)
);
create index if not exists command_lock_requests_age_idx on private.command_lock_requests (created_at);
comment on table private.command_lock_requests is
  'Which commands each named get_and_lock_slave_commands call locked, for an hour: a retried call returns them again.';

-- The three-argument form is replaced, not overloaded: PostgREST could not choose between them.
drop function if exists public.get_and_lock_slave_commands(text, integer, integer);

create or replace function public.get_and_lock_slave_commands(
  p_master_device_id text,
  p_limit integer default 5,
  p_timeout_seconds integer default 30,
  p_request_id text default null
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
  v_ids bigint[];
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
  if p_request_id is not null and p_request_id !~ '^[A-Za-z0-9_-]{8,64}$' then
    raise exception 'p_request_id must be 8..64 characters of A-Z a-z 0-9 _ -'
      using errcode = 'invalid_parameter_value';
  end if;
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

  if p_request_id is not null then
    -- A retry of a call whose answer was lost: the same rows again, as they are now, for as
    -- long as this caller still holds their lock; nothing new is locked.
    select r.command_ids into v_ids
      from private.command_lock_requests r
     where r.locker = v_locker and r.request_id = p_request_id
       and r.master_device_id = p_master_device_id;
    if found then
      return query
        select c.* from public.relay_commands_slave c
         where c.id = any(v_ids) and c.status = 'processing' and c.locked_by = v_locker
         order by c.type_rank, c.priority desc, c.created_at, c.id;
      return;
    end if;
  end if;

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
  select coalesce(array_agg(l.id), '{}') into v_ids from locked l;

  if p_request_id is not null then
    delete from private.command_lock_requests r where r.created_at < now() - interval '1 hour';
    insert into private.command_lock_requests (locker, request_id, master_device_id, command_ids)
    values (v_locker, p_request_id, p_master_device_id, v_ids)
    on conflict do nothing;
  end if;

  return query
    select c.* from public.relay_commands_slave c
     where c.id = any(v_ids)
     order by c.type_rank, c.priority desc, c.created_at, c.id;
end
$$;

comment on function public.get_and_lock_slave_commands(text, integer, integer, text) is
  'Locks up to p_limit of a master''s commands for p_timeout_seconds (see 0007-who-may-lock-commands). With p_request_id, a repeated call returns what the first one locked.';
revoke all on function public.get_and_lock_slave_commands(text, integer, integer, text) from public, anon;
grant execute on function public.get_and_lock_slave_commands(text, integer, integer, text) to authenticated, service_role;
