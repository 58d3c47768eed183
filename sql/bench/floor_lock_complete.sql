-- pgbench: the floor. The same two-step cycle as rpc_lock_complete.sql on bench.floor_queue (the
-- same shape and indexes, no RLS, no triggers, no checks of the caller): a bare
-- UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT 5) RETURNING in the RPC's
-- hand-out order, then a bare UPDATE that completes those ids.
\set m random(1, 50)
begin;
with locked as (
  update bench.floor_queue q
     set status = 'processing', locked_at = now(), locked_by = 'bench-agent',
         delivery_count = q.delivery_count + 1
   where q.id in (
     select f.id from bench.floor_queue f
      where f.master_device_id = 'bench-master-' || :m
        and f.status = 'pending'
      order by f.type_rank, f.priority desc, f.created_at, f.id
      limit 5
      for update skip locked)
  returning q.id
)
select coalesce(array_agg(id)::text, '{}') as ids from locked \gset
commit;
begin;
update bench.floor_queue
   set status = 'completed', completed_at = now(), execution_time_ms = 12
 where id = any (':ids'::bigint[]);
commit;
