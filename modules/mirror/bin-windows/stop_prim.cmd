@echo off
rem Script called on the primary server for stopping application services
rem For logging into SafeKit log use:
rem "%SAFE%\safekit" printi | printe "message"
rem 2 stop modes:
rem - graceful stop: call standard application stop with net stop
rem - force stop (%1=force): kill application's processes
rem stdout goes into Application log
echo "Running stop_prim %*"
set res=0
rem default: no action on forcestop
if "%1" == "force" goto end
rem Fill with your services stop call
if %res% == 0 goto end
"%SAFE%\safekit" printe "stop_prim failed"
:end
