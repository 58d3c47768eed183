-- pgbench: one lock+complete cycle of an edge agent through the RPCs, as PostgREST runs each
-- request: a transaction that sets the role and the JWT claims as local settings, then the call.
-- 1) lock up to 5 commands of a random bench master; 2) complete each of them, in one transaction
-- and in slave order: each completion locks its slave's relay_slaves row until commit, so two
-- cycles on one master that completed in hand-out order could deadlock.
\set m random(1, 50)
begin;
select set_config('role', 'authenticated', true),
       set_config('request.jwt.claims', '{"role":"authenticated","sub":"be000000-0000-0000-0000-00000000be01","agent_id":"bench-agent"}', true);
select coalesce(array_agg(c.id order by c.slave_mac_address, c.id)::text, '{}') as ids
  from public.get_and_lock_slave_commands('bench-master-' || :m, 5, 30) c \gset
commit;
begin;
select set_config('role', 'authenticated', true),
       set_config('request.jwt.claims', '{"role":"authenticated","sub":"be000000-0000-0000-0000-00000000be01","agent_id":"bench-agent"}', true);
select count(*)
  from unnest(':ids'::bigint[]) as u(id),
       lateral public.complete_slave_command(u.id, 12) c;
commit;
